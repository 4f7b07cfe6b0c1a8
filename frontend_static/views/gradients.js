// Gradient flow: per-parameter gradient statistics as layers x steps.
import {viewMetrics} from "../metrics.js";
import {heatmapView} from "./heatmap.js";

export default heatmapView({
  id: "gradients",
  title: "Gradient flow",
  kind: "param",
  metrics: viewMetrics("gradients"),
  profileTitle: "Gradient flow profile",
  intro: "One row per parameter tensor in model order (or per module, when there are more tensors than fit: " +
    "click a ▸ group to open it), one column per logged step (or bin of steps). " +
    "Click a cell to see every layer at that step below, and to select its layer.",
  help: {
    grad_norm: "Gradient L2 norm of each tensor (log colour scale): rows that fade towards the input mean " +
      "vanishing gradients, a sudden bright column an exploding step.",
    grad_max_abs: "Largest |gradient| element of each tensor (log colour scale).",
    weight_norm: "L2 norm of each weight tensor (log colour scale).",
    update_ratio: "Update ratio ‖Δw‖/‖w‖ of each tensor at the optimizer step (log colour scale); around 1e-3 " +
      "is typical, far below it the tensor hardly learns, far above it the step is too large.",
    grad_to_weight: "Gradient-to-weight ratio ‖g‖/‖w‖ (log colour scale), computed in the tab from the two norms.",
  },
});
