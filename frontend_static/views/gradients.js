// Gradient flow: per-parameter gradient statistics as layers x steps.
import {heatmapView} from "./heatmap.js";

export default heatmapView({
  id: "gradients",
  title: "Gradient flow",
  kind: "param",
  metrics: ["grad_norm", "grad_max_abs", "weight_norm", "update_ratio", "grad_to_weight"],
  profileTitle: "Gradient flow profile",
  intro: "One row per parameter tensor in model order, one column per logged step (or bin of steps). " +
    "Click a cell to see every layer at that step below, and to select its layer.",
});
