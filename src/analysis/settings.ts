// What a run can be asked to do (RunSettings, with one defaults object shared by the CLI and the library) and
// what it returns (Results and its parts).
import type { LlamaConfig } from "../model/config.js";

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
  window: number; /** Exact per-head patching (attn.hook_z, the first direction): a layers × heads grid per pair. */
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
export function resolveSettings(
  partial: Partial<RunSettings> = {},
  config?: Pick<LlamaConfig, "numLayers">,
): RunSettings {
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
  if (s.positions !== "all" && s.positions !== "response")
    fail(`positions must be "all" or "response", got ${String(s.positions)}`);
  for (const x of s.sites) if (!SITES.includes(x)) fail(`unknown site "${x}" (choose from ${SITES.join(", ")})`);
  for (const d of s.directions)
    if (!DIRECTIONS.includes(d)) fail(`unknown direction "${d}" (choose from ${DIRECTIONS.join(", ")})`);
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
  if (new Set(s.sites).size !== s.sites.length || new Set(s.directions).size !== s.directions.length)
    fail("sites and directions must not repeat");
  if (s.pcaLayer !== null && bad(s.pcaLayer)) fail(`pcaLayer ${s.pcaLayer} is ${where}`);
  return s;
}
