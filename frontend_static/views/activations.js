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
    "more than fit: click a ▸ group to open it), one column per logged step.",
  help: {
    dead_fraction: "Dead-unit fraction (0 to 1): the share of a ReLU-family site's units that were not positive " +
      "for any sample of the logged batch. Such units pass no gradient; a fraction that only grows means they do not recover.",
    saturation: "Saturated fraction (0 to 1): the share of a sigmoid or tanh site's outputs in the flat tails of " +
      "the curve, where its derivative is under 5 % of its peak, so the gradient through them shrinks at least 20x.",
    act_mean: "Activation mean: the mean output of each site over the logged batch (a diverging colour scale, " +
      "negative to positive).",
    act_std: "Activation std: the spread of each site's outputs over the logged batch (log colour scale); " +
      "shrinking towards 0 through the depth of the model means the signal fades, growing means it explodes.",
  },
});
