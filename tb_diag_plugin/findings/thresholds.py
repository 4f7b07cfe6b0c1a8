"""The findings rules' thresholds: every constant a rule uses, with the measurements behind it."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Thresholds:
    """Every constant a rule uses, with where its default comes from. Override any field.

    Shared
        persist_fraction (0.5): a condition counts when it holds on at least
            this share of the logged steps a rule looks at ...
        persist_tail (3): ... or on each of the last this-many logged steps
            (a fault that appeared late and is still there at the end).
        window_fraction (0.1), min_window (3): "start" and "end" of a run are
            the medians of its first and last max(min_window, 10 %) logged
            steps; medians keep one noisy batch from deciding.
        min_weight_norm (1e-3): tensors with a smaller L2 norm (zero-initialised
            biases, LayerNorm/BatchNorm shifts) are left out of ratios to
            their own weights, which would be meaningless.

    nonfinite
        amp_min_scale (1.0): under a GradScaler, a step skipped for
            non-finite gradients is by design; once the scale has fallen
            below 1 the gradients overflow unscaled and it is a fault.

    exploding_gradient
        explode_growth (100): total gradient norm this many times its start
            (the first logged value, or the early median if lower), on two
            logged steps in a row or right before NaN/Inf. Healthy runs of
            the suite and its variants grew at most 32x (SGD with momentum,
            logged every step); divergence grows by 1e4 to 1e17.
        explode_grad_to_weight (3000): a weight tensor whose gradient norm is
            this many times its own norm. Healthy: median 0.03-1, and 300
            for a summed (not averaged) MSE over 4096 outputs; N(0, 1) or
            N(0, 4) initialisations of deep ReLU nets give 7e3-6e6. SGD at
            lr 1e-3 would move such weights by 3x their size per step.

    vanishing_gradient
        vanish_ratio (1e-3): a tensor's gradient norm below this share of
            the model's largest, at the same step. Healthy weight tensors of
            the suite and its variants stay above 1e-2 (the lowest: a
            LayerNorm gain in the last of 8 residual blocks); a sigmoid
            passes back at most 1/4, so 5 sigmoid layers already lose ~1e-3.
        vanish_drop (1000), vanish_soft_ratio (1e-2): also vanishing, a layer
            whose share fell 1000x below its own share at the start and is
            under 1e-2 of the largest (gradients that collapsed during
            training).
        l2_floor_tolerance (1.02): an L2 term in the loss (DESIGN.md's own
            example adds 1e-4 * sum(p**2)) gives every weight a gradient
            2*lam*w that hides vanishing data gradients. When at least 3 (and
            a quarter of the) weight tensors share the smallest gradient-to-
            weight ratio to within 2 %, that ratio is taken as 2*lam and
            removed before comparing layers. Data gradients never line up
            that closely; the 20-layer sigmoid demo's 17 hidden layers sit
            at 2.00e-4 = 2 x 1e-4 exactly.
        l2_floor_contrast (10): ... and only where some weight tensor's ratio
            is 10x the floor or more (its data gradient clearly dominates):
            when every tensor sits on the floor the regulariser swamps the
            data everywhere, which loss_component_dominance reports.

    dead_relu
        dead_fraction (0.5): share of a ReLU site's units that were not
            positive for any sample of a logged batch (SageMaker Debugger's
            DeadRelu uses the same 50 % per layer). Healthy ReLU layers
            measured 0-28 % (the most with a batch of 8). With batches of a
            few samples a live unit is often "dead" for the batch: raise it.
        dead_error_fraction (0.99): a site this dead passes (almost) no
            gradient: error.

    saturated_activation
        saturation_fraction (0.25): share of a sigmoid/tanh site's outputs
            where the derivative is below 5 % of its peak (the logger's
            definition). Healthy hidden tanh/sigmoid layers measured 0-7 %;
            N(0, 1) weights on a 64-wide layer give ~30-40 %.
        saturation_improved (0.1): saturation that appears only later while
            the loss still falls by this share afterwards is taken as
            confident outputs (a sigmoid output under BCE), reported as info.

    update_ratio (||dw|| / ||w|| per optimizer step, weight tensors only)
        update_ratio_high (0.1): the median weight tensor changes by 10 %
            of its norm in one step. The usual healthy range is ~1e-3
            (Karpathy's rule of thumb); no logged step of a healthy run of
            the suite or its variants went above 0.1 (the most: 0.088, Adam
            at 1e-2), Adam at 0.1-0.3 and SGD at 2-3 reach 0.2-4.
        update_ratio_low (1e-6): even the fastest-moving weight tensor
            changes by under a millionth per step: nothing is learned in any
            practical number of steps.
        update_min_points (3), update_min_fraction (0.05): too-large updates
            must show on at least max(3, 5 % of) logged steps after the first
            (Adam's first step is lr / rms(w) by construction).
        update_weight_growth (4): or the median weight tensor's norm grew 4x
            over its first value: over-large steps that inflated the weights
            until the ratio looks moderate again (Adam at lr 0.1). Healthy
            runs of the suite and its variants grew at most 1.75x.

    loss_spike
        spike_window (20): the loss is compared with the previous this-many
            logged values (earlier spikes left out) ...
        spike_ratio (2): ... must exceed their median by this factor,
        spike_mad (4): by this many robust standard deviations (1.4826 x
            median absolute deviation) of the log-loss, in the window or over
            the run, whichever is larger (minibatch noise is multiplicative);
            for a run of n logged steps at least sqrt(2 ln n) + 1, one more
            than the expected largest of n normal draws (long runs offer
            more chances). Injected spikes measure 4.3-13; healthy runs
            reach 4.8 only near zero loss, where spike_min_rise rejects
            them; no spike in 160 synthetic log-normal noise runs of 300 and
            20,000 steps.
        spike_over_max (1.5): and their maximum by half again: minibatch
            noise, heavy-tailed with small batches, is not a spike (a
            batch of 8 samples gave isolated 4-6x excursions, never 1.5x
            the previous 20 values' maximum).
        spike_min_rise (0.5): It must rise by at least half the loss's
            starting level, i.e. undo a large part of what training achieved
            (a near-zero loss that triples on a hard batch is noise). The
            healthy runs' largest excursions rose 0.2-0.6 of it; none met
            all of these conditions at once.
        spike_recovery (10): it must come back below half way within this
            many logged steps; a jump that stays is divergence, reported by
            the other rules.

    loss_not_decreasing
        loss_min_decrease (0.05): the end-of-run loss must be at least 5 %
            below the start. Healthy runs of the suite and its variants fell
            18-99.7 %; lr 0, random labels and lr 1e-9 change it under 3 %.
        loss_min_points (8): fewer logged steps say nothing about a trend.

    loss_component_dominance
        dominance_ratio (10): a regulariser or auxiliary term at least 10x
            the data term, i.e. over 90 % of the loss value ...
        dominance_unlearned (0.5): ... while the data term is still above
            half its starting value (once the data is fitted, a weight-decay
            term larger than a near-zero data loss is normal).
        dominance_min_fraction (0.1): on at least this share of logged steps.
    """

    persist_fraction: float = 0.5
    persist_tail: int = 3
    window_fraction: float = 0.1
    min_window: int = 3
    min_weight_norm: float = 1e-3
    amp_min_scale: float = 1.0
    explode_growth: float = 100.0
    explode_grad_to_weight: float = 3000.0
    vanish_ratio: float = 1e-3
    vanish_drop: float = 1000.0
    vanish_soft_ratio: float = 1e-2
    l2_floor_tolerance: float = 1.02
    l2_floor_contrast: float = 10.0
    dead_fraction: float = 0.5
    dead_error_fraction: float = 0.99
    saturation_fraction: float = 0.25
    saturation_improved: float = 0.1
    update_ratio_high: float = 0.1
    update_ratio_low: float = 1e-6
    update_min_points: int = 3
    update_min_fraction: float = 0.05
    update_weight_growth: float = 4.0
    spike_window: int = 20
    spike_ratio: float = 2.0
    spike_mad: float = 4.0
    spike_over_max: float = 1.5
    spike_min_rise: float = 0.5
    spike_recovery: int = 10
    loss_min_decrease: float = 0.05
    loss_min_points: int = 8
    dominance_ratio: float = 10.0
    dominance_unlearned: float = 0.5
    dominance_min_fraction: float = 0.1

    def replace(self, **changes: float) -> Thresholds:
        """A copy with some fields changed; unknown names raise TypeError."""
        return Thresholds(**{**asdict(self), **changes})
