// What a run can be asked to do (RunSettings, with one defaults object shared by the CLI and the library) and
// what it returns (Results and its parts).
import type { LlamaConfig } from "../model/config.js";
import type { LassoCVResult } from "../stats/lasso.js";
import type { AttributionSummary } from "./attribution.js";

/** Where to patch: a per-layer hook site carrying a [B, T, hidden] activation. */
export type Site = "resid_post" | "resid_pre" | "attn_out" | "mlp_out";
export const SITES: readonly Site[] = ["resid_post", "resid_pre", "attn_out", "mlp_out"];

/** tuned->base: run the base model with the tuned model's activations patched in; base->tuned the reverse. */
export type Direction = "tuned->base" | "base->tuned";
export const DIRECTIONS: readonly Direction[] = ["tuned->base", "base->tuned"];

/** Every choice the analysis makes; defaults in DEFAULT_SETTINGS. */
export interface RunSettings {
  perToken: boolean; // mean instead of sum of response-token log-probabilities
  positions: "all" | "response"; // where patches apply
  alpha: number; // patch strength: h = h_dst + α (h_src − h_dst)
  sites: Site[];
  layers: number[] | null; // null = all
  directions: Direction[];
  controls: boolean; // random-direction and mean-ablation controls beside every real patch
  seed: number;
  folds: number; // K for CV of LASSO and probes
  C: number; // inverse L2 strength of the probes
  stabilityReps: number; // bootstrap refits for LASSO stability selection
  bootstrap: number; // resamples for recovery CIs
  pcaLayer: number | null; // null = first layer within 5% of the best resid_post recovery
  pcaTestFrac: number; // held-out fraction of pairs for PCA recovery
  batchPairs: number; // pairs per forward batch
  /** How patches are measured: "exact" patched forwards, "attribution" (gradient estimates of every patch at once), or "both". */
  method: Method;
  /** Consecutive layers patched together: a patch "at layer l" covers layers l … l+window−1 (cut at the last layer). */
  window: number;  /** Exact per-head patching (attn.hook_z, the first direction): a layers × heads grid per pair. */
  heads: boolean;
  /** Exact per-position patching (resid_post, the first direction) of the pair with the largest |gap|: a layer × token map. */
  positionMap: boolean;
}

/** Ways to measure the patch sweep. */
export const METHODS = ["exact", "attribution", "both"] as const;
export type Method = (typeof METHODS)[number];

/** Whether a run makes exact patched forwards (and so its controls). */
export const runsExact = (s: Pick<RunSettings, "method">): boolean => s.method !== "attribution";
/** Whether a run makes the random-direction and mean-ablation controls: exact patches only. */
export const runsControls = (s: Pick<RunSettings, "method" | "controls">): boolean => s.controls && runsExact(s);
/** Whether a run estimates patches by attribution. */
export const runsAttribution = (s: Pick<RunSettings, "method">): boolean => s.method !== "exact";

/** The defaults of `prefprobe run` and of runAnalysis. */
export const DEFAULT_SETTINGS: Readonly<RunSettings> = Object.freeze({
  perToken: false,
  positions: "all",
  alpha: 1,
  sites: ["resid_post"],
  layers: null,
  directions: ["tuned->base"],
  controls: true,
  seed: 0,
  folds: 5,
  C: 1,
  stabilityReps: 100,
  bootstrap: 1000,
  pcaLayer: null,
  pcaTestFrac: 0.5,
  batchPairs: 4,
  method: "exact",
  window: 1,
  heads: false,
  positionMap: false,
} satisfies RunSettings);

/** A setting that cannot be used; the message names it. */
export class SettingsError extends Error {
  override name = "SettingsError";
}

/** Defaults filled in for what `partial` leaves out, every value checked (against the model when given). */
export function resolveSettings(partial: Partial<RunSettings> = {}, config?: Pick<LlamaConfig, "numLayers">): RunSettings {
  const given = Object.fromEntries(Object.entries(partial).filter(([, v]) => v !== undefined)); // undefined: the default
  const s: RunSettings = { ...DEFAULT_SETTINGS, ...given };
  const fail = (msg: string): never => {
    throw new SettingsError(msg);
  };
  const int = (name: keyof RunSettings, min: number) => {
    const v = s[name] as number;
    if (!(Number.isInteger(v) && v >= min)) fail(`${name} must be an integer ≥ ${min}, got ${v}`);
  };
  int("seed", 0);
  int("folds", 2);
  int("stabilityReps", 0);
  int("bootstrap", 0);
  int("batchPairs", 1);
  int("window", 1);
  if (!Number.isFinite(s.alpha)) fail(`alpha must be a finite number, got ${s.alpha}`);
  if (!(s.C > 0 && Number.isFinite(s.C))) fail(`C must be positive, got ${s.C}`);
  if (!(s.pcaTestFrac > 0 && s.pcaTestFrac < 1)) fail(`pcaTestFrac must be in (0, 1), got ${s.pcaTestFrac}`);
  if (!METHODS.includes(s.method)) fail(`method must be one of ${METHODS.join(", ")}, got ${String(s.method)}`);
  if (s.positions !== "all" && s.positions !== "response") fail(`positions must be "all" or "response", got ${String(s.positions)}`);
  for (const x of s.sites) if (!SITES.includes(x)) fail(`unknown site "${x}" (choose from ${SITES.join(", ")})`);
  for (const d of s.directions) if (!DIRECTIONS.includes(d)) fail(`unknown direction "${d}" (choose from ${DIRECTIONS.join(", ")})`);
  const L = config?.numLayers;
  const bad = (l: number) => !(Number.isInteger(l) && l >= 0 && (L === undefined || l < L));
  const where = L === undefined ? "not a layer index" : `outside 0..${L - 1}`;
  const seen = new Set<number>();
  for (const l of s.layers ?? []) {
    if (bad(l)) fail(`layer ${l} is ${where}`);
    if (seen.has(l)) fail(`layer ${l} is listed twice`);
    seen.add(l);
  }
  if (s.layers && s.layers.length === 0) fail("layers is empty (use null for all layers)");
  if (new Set(s.sites).size !== s.sites.length || new Set(s.directions).size !== s.directions.length) fail("sites and directions must not repeat");
  if (s.pcaLayer !== null && bad(s.pcaLayer)) fail(`pcaLayer ${s.pcaLayer} is ${where}`);
  return s;
}

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

/** Per pair: "direction site" → per patched layer estimate; and, for the first combo key, per position. */
export interface PairAttribution {
  gains: Record<string, number[]>;
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
  gains: Record<string, number[]>; // "direction site" → per patched layer (real patches; empty with method "attribution")
  /** Attribution estimates (methods "attribution" and "both"), else null. */
  attribution: PairAttribution | null;
  /** With `heads`: exact gains [layer][head] of patching one head's attn.hook_z (the first direction), else null. */
  heads: number[][] | null;
  random_direction: Record<string, number[]> | null; // the same for the random-direction control
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
  recovery: Array<{ k: number; k_used: number; recovery: number; random_subspace: number }>;
  components: Float32Array;
  /** Components that explain 90% of the training differences (at most the rank). */
  k_90: number;
  /** The training pairs' mean h_tuned − h_base over response positions at this layer (steering and subspace.safetensors). */
  steering_vector: Float32Array;
  /** Held-out margin gains of the base model alone with β·v added at this layer, per vector and strength β. */
  steering: Array<{ vector: string; norm: number; by_strength: Array<{ strength: number; mean_gain: number; recovery: number }> }>;
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
  summary: { mean_margin_base: number; mean_margin_tuned: number; mean_gap: number; tuned_prefers_chosen: number; base_prefers_chosen: number };
  patching: PatchingEntry[];
  /** Attribution patching's estimates and their agreement with the exact sweep (methods "attribution" and "both"). */
  attribution: AttributionSummary | null;
  /** With `heads`: mean exact per-head gain [layer][head] and as a share of the mean gap; null otherwise. */
  heads: { direction: Direction; mean_gain: number[][]; recovery: number[][] } | null;
  /** With `positionMap`: exact gains [layer][position] of patching one position (both rows) of the pair with the largest |gap|. */
  position_map: { pair: number; direction: Direction; gap: number; gains: number[][]; ids: { prompt: number[]; chosen: number[]; rejected: number[] }; tokens?: string[] } | null;
  lasso: LassoResult | null;
  probes: ProbeResult[];
  pca: LowRankResult | null;
  /** The K-fold assignment shared by LASSO and the probes (kFolds over pairs with the run's seed). */
  cv: { folds: number; fold_of_pair: number[] };
  logit_lens: { layers: string[]; base: number[]; tuned: number[] };
  mean_diff: Float32Array; // [L, H]: mean h_tuned − h_base at resid_post over response positions
  timings_ms: Record<string, number>;
}

/** Progress and streaming hooks for a run. */
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
