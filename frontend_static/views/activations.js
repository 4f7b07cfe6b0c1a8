// Activations: dead units, saturation and activation statistics per site.
import {viewMetrics} from "../metrics.js";
import {heatmapView} from "./heatmap.js";

export default heatmapView({
  id: "activations",
  title: "Activations",
  kind: "site",
  metrics: viewMetrics("activations"),
  profileTitle: "Activation profile",
  intro: "One row per activation site (module or functional call, with its type; per module when there are " +
    "more than fit: click a ▸ group to open it), one column per logged step. " +
    "A dead unit was not positive for any sample of the logged batch.",
});
