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
});
