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
        vanish_error_share (0.5), vanish_error_ratio (1e-4): an error when at
            least half of the weight tensors vanish and their median share is
            1e-4 or less: most of the network gets 10,000x less gradient than
            its most-trained tensor and cannot learn (the 20-layer sigmoid
            demo: 34 of 40 tensors at 1.7e-6 to 3.6e-4).
        l2_floor_tolerance (1.02): an L2 term in the loss (the README's own
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

        loss_jump (10): a loss at 10x the median of the values before it (one
            value is enough: a jump right after the first logged step) that
            also rises by spike_min_rise of its level is a jump, whether or
            not it comes back (nanoGPT at lr 3: 4.3 -> 1,050 at step 10).
            Minibatch noise in the suite never reached 5x.

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

    loss_diverged, weight_norm_growth, logit_growth, gradient_clipping,
    adam_eps: measured with `benchmarks/divergence.py` (the suite's TinyGPT,
    AdamW, 120 steps on CPU, every quantity computed from torch directly) and
    on the suite's runs through the logger.
        diverge_ratio (3): the loss stands at 3x its early level (the first
            value, or the early median if lower) or more ... Healthy runs
            (the suite; GPTs with warm-up + cosine at lr 6e-4 and 3e-3)
            never rose above 1.01x their start; AdamW at lr 0.3 peaked at
            1.6x (3.1x at d 48) and ended at 0.82x; at lr 1 it peaked at
            37.5x and ended at 27.9x, no NaN.
        diverge_persist (0.8): ... on this share of the logged steps from the
            onset to the end, and the last window's median too (a spike comes
            back; loss_spike reports it).
        diverge_min_after (3): logged steps at or after the onset.
        diverge_error_ratio (5): the median loss since the onset at 5x the
            early level or more ("grew tens of times and stayed"): error. For
            cross-entropy the start is about chance level, so 5x is far worse
            than guessing. The suite's lr-1 GPT sat at 9.8-12.6x through the
            logger (peaks 80-93x); the issue's nanoGPT at lr 3 at 2-75x.

    weight_norm_growth (weight tensors, norm at start >= min_weight_norm)
        weight_growth_ratio (10): a tensor's norm at 10x its start (or 10x a
            tenth of the median tensor's start, for tiny initialisations) on
            the last logged steps. Healthy GPTs grew at most 1.6x per tensor,
            the suite's healthy runs 1.75x (median tensor); AdamW at lr 0.03
            4.2x (it still learned), at lr 0.3 9.2x, at lr 1 10.8x (5x within
            10 steps; through the logger 17-63x at the end).
        weight_growth_error (100): 100x: error.

    weight_decay_equilibrium
        decay_product_high (1e-2): lr x weight_decay per step. Usual: AdamW
            6e-4 x 0.1 = 6e-5 (nanoGPT), 1e-3 x 0.05; SGD 0.1 x 5e-4 = 5e-5;
            ViT-style 3e-3 x 0.3 = 1e-3. At 1e-2 decay alone halves a weight
            in 70 steps. AdamW lr 1e-2, wd 30 (0.3) shrank the GPT's median
            weight tensor to 3.5e-6 of its start (update ratios 0.094) with
            the loss at 0.94x its start.
        decay_usual_wd (0.3): a weight_decay at or below this (ViT-style
            AdamW 0.3 and everything usual below it) is not itself the fault:
            the product is high because the learning rate is (the small GPT
            at AdamW lr 1, wd 0.1: product 0.1, weights shrank to 0.0015x),
            and the advice is to lower the learning rate, not the decay.
        decay_shrink (0.5): ... and the median weight tensor's norm ends at
            half its start or less (AdamW wd 30 lr 1e-2: 0.22x on the suite's
            MLP, update ratios pinned at 0.01-0.03, Adam's steps pushing
            against the decay). Weights that grow are not pinned: the GPT at
            lr 1 with AdamW's default decay 0.01 (product 0.01) grew 20x.
        decay_collapse (0.1): without the optimizer's settings (an older
            recording), the median weight tensor ending at a tenth of its
            start or less is named as likely decay. Healthy runs ended at
            0.43-1.9x (the least: Adam, coupled wd 1e-2, a 256-wide MLP,
            update ratios 0.013-0.02); AdamW wd 30 at lr 1e-2 went to 3.5e-6x
            (GPT) but only to 0.24x (the suite's MLP, which this alone
            therefore misses), an L2 term of 1.0 to 0.23x.

    no_gradient
        (no constant) a parameter the optimizer holds whose gradient was
            None (grad_missing 1) or exactly 0 on every logged step before the
            cutoff; frozen on purpose (requires_grad False, or in no optimizer
            group) is never flagged.

    gradient_clipping
        clip_share (0.5): clipping (grad_norm_total below grad_norm_preclip
            by more than 0.1 %) changed at least half of the logged steps ...
        clip_min_points (5): ... of at least this many.
        (by design) a recurrent model (LSTM/GRU/RNN) whose gradients are
            clipped while its loss falls by loss_min_decrease is the
            recipe of RNN language models (pytorch/examples'
            word_language_model: SGD at lr 20, clip 0.25): clipping, and the
            large update ratios it sets (0.12-0.22 median there), are info.
        clip_scaled_share (1e-3): under AMP, a pre-clip norm whose median is
            at least this share of the median loss scale is of the scaled
            gradients (clip_grad_norm_ before scaler.unscale_): an error, the
            updates shrink by the scale. Unscaled gradient norms are O(1)
            against scales of 2^10 to 2^16 (1e-5 to 1e-3 of them); scaled
            ones are 0.1-10x the scale. The healthy GPTs
            with clip 1.0 at lr 6e-4 and 3e-3 clipped 0 % of their steps
            (pre-clip norm p90 0.61-0.62); at lr 1 the pre-clip norm's median
            was 49.

    logit_growth
        logit_max (100): max |logit| of the output layer at 100 or more on
            persistent steps ... Healthy GPTs reached 2.4-18.5 (the last at
            lr 0.03, loss 0.13), the lr-1 GPT 374.
        logit_growth (10): ... and 10x its start.

    adam_eps
        adam_eps_fraction (0.5): at least half of a weight tensor's entries
            have sqrt(v_hat) < eps on persistent steps (while it gets a
            gradient). Every GPT run above: 0 on weight tensors; the
            attention's packed in_proj_bias reads 1/3 (the key bias gets no
            gradient by construction), so biases are left out.

    not_in_optimizer (no constant): a parameter the structure document
        marks in no optimizer group (requires_grad not False) that got a
        gradient on a logged step. An error when the optimizer holds
        tensors the model does not (optimizer_orphans) or the parameters
        left out come after every held one (a replaced head); info when they
        all come before the held ones (a backbone frozen by leaving it out).

    grad_not_reset
        (persist_fraction) grad_carried 1 on persistent logged steps: the
            logger saw the backward add to the previous optimizer step's
            gradients, an exact observation.
        grad_reset_growth (3): an error when the total gradient norm at the
            end of that stretch is 3x its start (summed gradients grow with
            the step count; a healthy norm falls or holds).

    module_mode (eval_in_train, train_in_eval from the logger)
        eval mode in a training forward on persistent logged steps; training
        mode under no_grad on two logged steps or more (one odd forward is
        not an evaluation habit).

    learning rate (lr_zero, lr_collapsed, lr_unbounded)
        lr_zero: a parameter group at lr 0 on persist_fraction of its steps.
        lr_collapse_ratio (1e-3): the rate falls to 1e-3 of its peak ...
        lr_collapse_within (0.5): ... within the first half of the run and
            stays there. Cosine to 0 reaches 1e-3 of its peak only in the
            last 2 % of the run; StepLR(30, 0.1) over 90 epochs at 67 %;
            ExponentialLR(0.95) per epoch over 100 epochs ends at 6e-3. A
            per-epoch StepLR(1, 0.1) stepped per batch reaches 1e-3 after 3
            batches.
        lr_collapse_error (1e4): an error when it fell 10^4 times or more,
            or when the loss moved less than loss_min_decrease since.
        lr_growth (100), lr_growth_half (10): climbing without bound: 100x
            its first value, at its largest at the end, and 10x over the
            second half of the run alone (exponential: a linear warm-up
            gains at most 2x over its second half).
        lr_growth_error (1e3): an error at 1000x its start.

    output_loss_mismatch (logit_min, logit_max, logit_rowsum_dev)
        (persist_fraction) outputs in [0, 1] on persistent logged steps;
        rowsum_tolerance (1e-3): every row summing to 1 within this:
            already a softmax;
        sigmoid_loss_floor (0.313 = -log(sigmoid(1))), and for softmax rows
            logsumexp(p) - 1 (from logit_lse): the least a loss applying its
            own sigmoid/softmax to such outputs can reach; a loss that ends
            below floor x squash_floor_tolerance (0.98) does not apply one
            (BCELoss, log + NLLLoss), and nothing is reported.
        sigmoid_balanced_floor (0.5): for values in [0, 1] that are not rows
            of probabilities, a warning only when the loss stays at or above
            (0.313 + 0.693) / 2, the least a double sigmoid allows with
            balanced labels; between the two floors BCELoss on a sigmoid fits
            as well, and it is a note (info).

    gradient_spike (global and per tensor)
        grad_spike_window (20): each logged gradient norm is compared with
            the median of the previous this-many (earlier spikes left out) ...
        grad_spike_ratio (4): ... must exceed it this many times ...
        grad_spike_z (6): ... and by this many robust standard deviations
            (1.4826 x MAD) of the log-norm over the window or the run,
            whichever is larger, and sqrt(2 ln n) + 1 for n logged steps.
        grad_spike_min (2), grad_spike_single (100): reported when it spikes
            on at least 2 logged steps, or once by 100x or more. The spike
            score is the share of logged steps that spike.
        grad_spike_clip_pct (95): the advice clips at this percentile of
            the logged total norm (outside the spikes).
        grad_spike_early_steps (5): before a window exists, in a recurrent
            or attention model that does not clip, trained by an optimizer
            whose step follows the gradient's size (not the Adam family,
            whose step it divides out): a total norm (logged, or
            the between-steps maximum) within this many logged steps after
            the first that reaches grad_spike_ratio x the first logged norm
            (the smallest baseline there is, a single step) is a blow-up ...
        grad_spike_early_loss_rise (1.25): ... when the loss, from the jump
            to two logged steps after it, rises this many times above its
            lowest logged value before it (the step hurt). word_language_model's
            LM at lr 20 without clipping (tests/everyday_bugs.py, seeds 0-4):
            norms 4.0-8.2x the first, losses 1.33-23x; clipped at 0.25, the
            pre-clip norm reaches 4x while the loss falls; an unclipped LSTM
            under Adam stays under 1.2x anyway.

    inputs_not_normalised (needs input_std/input_mean: a floating-point model input)
        input_scale_max (10): the median over logged steps of the input's std
            (or |mean|) at or above this is raw data, not unit-scale input
            (standardised features and images in [0, 1] measure 0.3-1; the
            catalogue's raw features 100). Reported at the worst severity of
            the blow-up findings it explains, at info when it explains none,
            and not at all when a normalisation layer comes first.

    overfitting (needs val_loss, from diag.evaluate)
        overfit_min_evals (4): validation points needed.
        overfit_rise (0.1): the last validation losses stand 10 % or more
            above the best one ...
        (train) ... while the training loss at the end is at least
            loss_min_decrease below its value at the best validation step.
        overfit_gap_open (0.25): the gap opened at the first evaluation
            after the narrowest gap where the gap had covered a quarter of
            its growth.

    underfitting (needs val_loss)
        underfit_high (0.5): the training loss ends above half its start ...
        underfit_flat (0.05): ... and fell by under 5 % over the second half
            of the run; validation within underfit_gap (0.2) of training;
            and no gradient, update or activation finding explains it.
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
    vanish_error_share: float = 0.5
    vanish_error_ratio: float = 1e-4
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
    loss_jump: float = 10.0
    loss_min_decrease: float = 0.05
    loss_min_points: int = 8
    dominance_ratio: float = 10.0
    dominance_unlearned: float = 0.5
    dominance_min_fraction: float = 0.1
    diverge_ratio: float = 3.0
    diverge_persist: float = 0.8
    diverge_min_after: int = 3
    diverge_error_ratio: float = 5.0
    weight_growth_ratio: float = 10.0
    weight_growth_error: float = 100.0
    decay_product_high: float = 1e-2
    decay_usual_wd: float = 0.3
    decay_shrink: float = 0.5
    decay_collapse: float = 0.1
    clip_share: float = 0.5
    clip_min_points: int = 5
    clip_scaled_share: float = 1e-3
    logit_max: float = 100.0
    logit_growth: float = 10.0
    adam_eps_fraction: float = 0.5
    grad_reset_growth: float = 3.0
    lr_collapse_ratio: float = 1e-3
    lr_collapse_within: float = 0.5
    lr_collapse_error: float = 1e4
    lr_growth: float = 100.0
    lr_growth_half: float = 10.0
    lr_growth_error: float = 1e3
    rowsum_tolerance: float = 1e-3
    sigmoid_loss_floor: float = 0.313
    squash_floor_tolerance: float = 0.98
    sigmoid_balanced_floor: float = 0.5
    grad_spike_window: int = 20
    grad_spike_ratio: float = 4.0
    grad_spike_z: float = 6.0
    grad_spike_min: int = 2
    grad_spike_single: float = 100.0
    grad_spike_clip_pct: float = 95.0
    grad_spike_early_steps: int = 5
    grad_spike_early_loss_rise: float = 1.25
    input_scale_max: float = 10.0
    overfit_min_evals: int = 4
    overfit_rise: float = 0.1
    overfit_gap_open: float = 0.25
    underfit_high: float = 0.5
    underfit_flat: float = 0.05
    underfit_gap: float = 0.2

    def replace(self, **changes: float) -> Thresholds:
        """A copy with some fields changed; unknown names raise TypeError."""
        return Thresholds(**{**asdict(self), **changes})
