// The result schema: what a run records per pair (records.jsonl, results.json's pairs) and over all pairs
// (results.json), the per-pair state phase 1 hands to phase 2, and the callbacks and interruption of a run.
import type { LassoCVResult, LassoPermutation } from "../stats/lasso.js";
import type { Direction, Site } from "./settings.js";

/** Gains of one kind of patch with their recovery (mean gain / mean gap) and bootstrap CI. */
export interface GainSummary {
  gains: number[];
  recovery: number;
  recovery_ci: [number, number];
}

/** A control's gains, plus the bootstrap CI of (real − control) recovery: above 0 means the real patch beats it. */
export interface ControlSummary extends GainSummary {
  real_minus_control_ci: [number, number];
}

/** One (direction, site, layer) of the patch sweep, with its controls. */
export interface PatchingEntry extends GainSummary {
  /** Whether the gains are exact patched forwards or attribution estimates (when the run made no exact patches). */
  method: "exact" | "attribution";
  /** Layers patched together, from `layer` on (1: that layer alone). */
  window: number;
  direction: Direction;
  site: Site;
  layer: number;
  alpha: number;
  controls: { random_direction: ControlSummary; mean_ablation: ControlSummary } | null;
}

/** Per pair: "direction site layer" → estimate; and, for the first "direction site" of the plan, per position. */
export interface PairAttribution {
  gains: Record<string, number>;
  /** The first "direction site" of the plan per layer and position: chosen [L][T_chosen row], rejected [L][T_rejected row]. */
  positions: { key: string; chosen: number[][]; rejected: number[][] };
  /** The first direction's attn.hook_z estimate per layer and head. */
  heads: number[][];
}

/** Everything measured for one pair on its own; streamed to pairs.jsonl as each pair completes. */
export interface PairRecord {
  index: number; // position among all pairs of the run (the same in every shard)
  line: number;
  tokens: { prompt: number; chosen: number; rejected: number };
  ids: { prompt: number[]; chosen: number[]; rejected: number[] }; // the token ids scored
  logp: { base: { chosen: number; rejected: number }; tuned: { chosen: number; rejected: number } };
  margin: { base: number; tuned: number };
  gap: number;
  distance: number[]; // per layer: mean ‖h_tuned − h_base‖ over response positions (resid_post)
  cosine_distance: number[];
  gains: Record<string, number>; // "direction site layer" → gain (real patches; empty with method "attribution")
  /** Attribution estimates (methods "attribution" and "both"), else null. */
  attribution: PairAttribution | null;
  /** With `heads`: exact gains [layer][head] of patching one head's attn.hook_z (the first direction), else null. */
  heads: number[][] | null;
  random_direction: Record<string, number> | null; // the same for the random-direction control
  lens: { base: number[]; tuned: number[] }; // logit-lens margin per depth (embedding, then after each block)
}

/**
 * A pair's record plus the vectors the dataset-level stages sum over pairs (probe features, the mean
 * difference, the sites' sums for mean-ablation), laid out as `sumsLayout` says.
 */
export interface PairState {
  record: PairRecord;
  sums: Float64Array;
}

/** The low-rank reconstruction at one layer. */
export interface LowRankResult {
  layer: number;
  site: "resid_post";
  chosen_by: string;
  train_pairs: number[];
  test_pairs: number[];
  n_rows: number;
  explained_variance_ratio: number[];
  /** Per k: held-out recovery of the top-k subspace and a random k-dim one, with their per-pair gains (test_pairs' order). */
  recovery: Array<{
    k: number;
    k_used: number;
    recovery: number;
    random_subspace: number;
    gains?: number[];
    random_gains?: number[];
  }>;
  components: Float32Array;
  /** Components that explain 90% of the training differences (at most the rank). */
  k_90: number;
  /** The training pairs' mean h_tuned − h_base over response positions at this layer (steering and subspace.safetensors). */
  steering_vector: Float32Array;
  /** Held-out margin gains of the base model alone with β·v added at this layer, per vector and strength β. */
  steering: Array<{
    vector: string;
    norm: number;
    by_strength: Array<{ strength: number; mean_gain: number; recovery: number; gains?: number[] }>;
  }>;
}

/** LASSO of the per-pair gap on per-layer distances, with its inputs and how its selection moves with the CV seed. */
export type LassoResult = LassoCVResult & {
  X: number[][];
  y: number[];
  feature: string;
  nonzero_layers: number[];
  /** The layers selected when only the CV fold seed changes (seed, seed+1, …). */
  seed_sets: Array<{ seed: number; nonzero_layers: number[] }>;
  /** Whether every seed in seed_sets selects the same layers. */
  stable_across_seeds: boolean;
  /** The CV error against the gaps shuffled across pairs (absent in results written before it existed). */
  permutation?: LassoPermutation;
};

/** Cross-validated probe accuracy of one model at one layer. */
export interface ProbeResult {
  model: "base" | "tuned";
  layer: number;
  accuracy: number;
  diff_means_accuracy: number;
}

/** What runAnalysis returns. */
export interface Results {
  n_pairs: number;
  num_layers: number;
  hidden_size: number;
  pairs: PairRecord[];
  summary: {
    mean_margin_base: number;
    mean_margin_tuned: number;
    mean_gap: number;
    tuned_prefers_chosen: number;
    base_prefers_chosen: number;
  };
  patching: PatchingEntry[];
  /** Attribution patching's estimates and their agreement with the exact sweep (methods "attribution" and "both"). */
  attribution: AttributionSummary | null;
  /** With `heads`: mean exact per-head gain [layer][head] and as a share of the mean gap; null otherwise. */
  heads: { direction: Direction; mean_gain: number[][]; recovery: number[][] } | null;
  /** With `positionMap`: exact gains [layer][position] of patching one position (both rows) of the pair with the largest |gap|. */
  position_map: {
    pair: number;
    direction: Direction;
    gap: number;
    gains: number[][];
    ids: { prompt: number[]; chosen: number[]; rejected: number[] };
    tokens?: string[];
  } | null;
  lasso: LassoResult | null;
  probes: ProbeResult[];
  pca: LowRankResult | null;
  /** The K-fold assignment shared by LASSO and the probes (kFolds over pairs with the run's seed). */
  cv: { folds: number; fold_of_pair: number[] };
  logit_lens: { layers: string[]; base: number[]; tuned: number[] };
  mean_diff: Float32Array; // [L, H]: mean h_tuned − h_base at resid_post over response positions
  timings_ms: Record<string, number>;
}

/** How attribution estimates compare with exact patches at one (direction, site, layer). */
export interface AttributionEntry {
  direction: Direction;
  site: string;
  layer: number;
  mean_estimate: number;
  recovery_estimate: number; // mean estimate / mean gap
  /** With method "both": the exact sweep's recovery, the Pearson correlation over pairs and the largest |estimate − exact|. */
  exact: { recovery: number; correlation: number; max_abs_error: number } | null;
}

/** The dataset-level view of attribution patching (results.attribution). */
export interface AttributionSummary {
  entries: AttributionEntry[];
  /** Mean per-head estimate over pairs [layer][head] (the first direction's attn.hook_z), and as a share of the mean gap. */
  heads: { direction: Direction; mean: number[][]; recovery: number[][] };
  /** The per-position estimate of the pair with the largest |gap|, for the report's heatmap. */
  heatmap: {
    pair: number;
    key: string;
    gap: number;
    layers: number[];
    ids: { prompt: number[]; chosen: number[]; rejected: number[] };
    chosen: number[][];
    rejected: number[][];
    tokens?: { chosen: string[]; rejected: string[] };
  } | null;
}

/** Milliseconds spent per stage (summed over batches, and over workers when they run in parallel). */
export type StageTimes = Record<string, number>;

/** Adds each stage's time in `from` to `into` (returns `into`). */
export function addTimes(into: StageTimes, from: StageTimes): StageTimes {
  for (const [k, v] of Object.entries(from)) into[k] = (into[k] ?? 0) + v;
  return into;
}

export interface RunCallbacks {
  onStage?: (stage: string, total: number) => void;
  /** Called with each batch's phase-1 stage times, as the batch completes. */
  onTimes?: (ms: StageTimes) => void;
  onProgress?: (done: number) => void;
  /** Called with each batch's pairs as they complete (before the next batch starts). */
  onPairs?: (states: PairState[]) => void;
  /** Polled between batches: return true to stop (runAnalysis then throws an Interrupted error). */
  shouldStop?: () => boolean;
}

/** A run stopped by shouldStop between batches; `done` pairs had completed. */
export class Interrupted extends Error {
  override name = "Interrupted";
  constructor(
    readonly done: number,
    readonly total: number,
  ) {
    super(`interrupted after ${done} of ${total} pairs`);
  }
}
