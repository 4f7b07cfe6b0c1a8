// Activations: dead units, saturation and activation statistics per site.
import {heatmapView} from "./heatmap.js";

export default heatmapView({
  id: "activations",
  title: "Activations",
  kind: "site",
  metrics: ["dead_fraction", "saturation", "act_mean", "act_std"],
  profileTitle: "Activation profile",
  intro: "One row per activation site (module or functional call, with its type), one column per logged step. " +
    "A dead unit was not positive for any sample of the logged batch.",
});
