// What a run can be asked to do (RunSettings, with one defaults object shared by the CLI and the library) and
// what it returns (Results and its parts).
import type { LlamaConfig } from "../model/config.js";
import type { BlockSite } from "../model/hooks.js";

/**
 * Where to patch: a per-layer site carrying a [B, T, hidden] activation, named as in the hook vocabulary
 * (model/hooks.ts; hookName(site, l) is its hook). Per-head z is patched by `heads`. The order keys random draws.
 */
export const SITES = ["resid_post", "resid_pre", "attn_out", "mlp_out"] as const satisfies readonly BlockSite[];
export type Site = (typeof SITES)[number];

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
  /** How text pairs are read (by the study, before tokenizing; pairs given already tokenized keep it for the record). */
  format: PairFormat;
}

/**
 * How text pairs become text to score: "raw", prompt + response as written (BOS as the tokenizer's settings say);
 * "chat", conversations rendered through the model's chat template (src/io/chat.ts).
 */
export const PAIR_FORMATS = ["raw", "chat"] as const;
export type PairFormat = (typeof PAIR_FORMATS)[number];

/** Ways to measure the patch sweep. */
export const METHODS = ["exact", "attribution", "both"] as const;
export type Method = (typeof METHODS)[number];

/** Whether a run makes exact patched forwards (and so its controls). */
export const runsExact = (s: Pick<RunSettings, "method">): boolean => s.method !== "attribution";
/** Whether a run makes the random-direction and mean-ablation controls: exact patches only. */
export const runsControls = (s: Pick<RunSettings, "method" | "controls">): boolean => s.controls && runsExact(s);
/** Whether a run estimates patches by attribution. */
export const runsAttribution = (s: Pick<RunSettings, "method">): boolean => s.method !== "exact";

/** A setting that cannot be used; the message names it. */
export class SettingsError extends Error {
  override name = "SettingsError";
}

/**
 * One setting: its default, what a value must be (`check` returns what is wrong, or null), and how the command
 * line gives it (`flag` and `help`; `parse` turns the flag's text into a value, `fromCli` the parsed option into
 * the setting, `shown` the default its help shows when that is not the default itself).
 */
export interface SettingSpec<V> {
  default: V;
  check?: (v: V, numLayers: number | undefined) => string | null;
  flag: string;
  help: string;
  choices?: readonly string[];
  parse?: (text: string) => unknown;
  fromCli?: (value: unknown) => V | undefined;
  shown?: string;
  /** The CLI leaves the setting out when its flag is not given (the study then picks the default). */
  unsetOnCli?: boolean;
}

/** An integer ≥ min, from a flag's text (the message names `key`: a setting, or the CLI's own flag). */
export const integerText = (key: string, min: number) => (text: string) => {
  const n = /^\s*-?\d+\s*$/.test(text) ? Number(text) : NaN; // Number("") would be 0
  if (!Number.isInteger(n) || n < min) throw new SettingsError(`${key} must be an integer ≥ ${min}, got "${text}"`);
  return n;
};
/** A number, from the flag's text; its range is the setting's check. */
const numberText = (key: string) => (text: string) => {
  const n = Number(text);
  if (text.trim() === "" || !Number.isFinite(n)) throw new SettingsError(`${key} must be a number, got "${text}"`);
  return n;
};
const integer = (min: number) => (v: number) =>
  Number.isInteger(v) && v >= min ? null : `must be an integer ≥ ${min}`;
const list = (text: string) => text.split(",").map((x) => x.trim());

/** The fewest bootstrap resamples a recovery interval is made from (0 makes none). */
export const MIN_BOOTSTRAP = 100;
/** The fewest bootstrap refits LASSO stability selection is made from (0 makes none). */
export const MIN_STABILITY_REPS = 2;

/** The largest patch strength |α| a run takes: 1 is the whole difference; beyond ~100 a patch leaves both models' range. */
export const MAX_ALPHA = 100;

/** Every run setting: defaults, validation and the CLI's options come from here. */
export const RUN_SETTINGS: { readonly [K in keyof RunSettings]: SettingSpec<RunSettings[K]> } = {
  perToken: {
    default: false,
    flag: "--per-token",
    help: "score responses by mean instead of sum of token log-probabilities",
    fromCli: (v) => !!v,
  },
  positions: {
    default: "all",
    check: (v) => (v === "all" || v === "response" ? null : `must be "all" or "response"`),
    flag: "--positions <which>",
    help: "positions a patch replaces",
    choices: ["all", "response"],
  },
  alpha: {
    default: 1,
    // |α| ≫ 1 moves an activation far past both models' (α = 1e30 read −236.7% everywhere): no finding
    check: (v) =>
      Number.isFinite(v) && Math.abs(v) <= MAX_ALPHA ? null : `must be a number in [−${MAX_ALPHA}, ${MAX_ALPHA}]`,
    flag: "--alpha <a>",
    help: "patch strength: h = h_base + α (h_tuned − h_base)",
    parse: numberText("alpha"),
  },
  sites: {
    default: ["resid_post"],
    check: (v) =>
      v
        .map((x) => (SITES.includes(x) ? null : `has an unknown site "${x}" (choose from ${SITES.join(", ")})`))
        .find((m) => m) ?? (new Set(v).size === v.length ? null : "must not repeat"),
    flag: "--sites <list>",
    help: `comma-separated sites to patch (${SITES.join(", ")})`,
    parse: list,
    shown: "resid_post",
  },
  layers: {
    default: null,
    check: (v, L) => {
      if (v === null) return null;
      if (v.length === 0) return "is empty (use null for all layers)";
      for (const [i, l] of v.entries()) {
        if (!(Number.isInteger(l) && l >= 0 && (L === undefined || l < L)))
          return `has layer ${l}, ${L === undefined ? "not a layer index" : `outside 0..${L - 1}`}`;
        if (v.indexOf(l) !== i) return `lists layer ${l} twice`;
      }
      return null;
    },
    flag: "--layers <list>",
    help: "comma-separated layers to patch (default: all)",
    parse: (text) => list(text).map(integerText("layers", 0)),
    fromCli: (v) => (v === undefined ? null : (v as number[])),
  },
  directions: {
    default: ["tuned->base"],
    check: (v) =>
      v
        .map((d) =>
          DIRECTIONS.includes(d) ? null : `has an unknown direction "${d}" (choose from ${DIRECTIONS.join(", ")})`,
        )
        .find((m) => m) ?? (new Set(v).size === v.length ? null : "must not repeat"),
    flag: "--direction <d>",
    help: "patching direction",
    choices: ["tuned->base", "base->tuned", "both"],
    fromCli: (v) => (Array.isArray(v) ? v : v === "both" ? ["tuned->base", "base->tuned"] : [v as Direction]),
    shown: "tuned->base",
  },
  controls: {
    default: true,
    flag: "--no-controls",
    help: "skip the random-direction and mean-ablation controls",
    fromCli: (v) => v !== false,
  },
  seed: {
    default: 0,
    check: integer(0),
    flag: "--seed <s>",
    help: "random seed (controls, folds, splits)",
    parse: integerText("seed", 0),
  },
  folds: {
    default: 5,
    check: integer(2),
    flag: "--folds <k>",
    help: "K for cross-validation",
    parse: integerText("folds", 2),
  },
  C: {
    default: 1,
    check: (v) => (v > 0 && Number.isFinite(v) ? null : "must be positive"),
    flag: "--C <c>",
    help: "inverse L2 strength of the probes",
    parse: numberText("C"),
  },
  stabilityReps: {
    default: 100,
    // a selection frequency needs two refits at least: one refit's is its own 0/1 selection, which the verdict
    // would read as "selected in 100% of refits"
    check: (v) =>
      Number.isInteger(v) && (v === 0 || v >= MIN_STABILITY_REPS)
        ? null
        : `must be 0 (no stability selection) or at least ${MIN_STABILITY_REPS} refits`,
    flag: "--stability <n>",
    help: `bootstrap refits for LASSO stability selection (0: none, else at least ${MIN_STABILITY_REPS})`,
    parse: integerText("stabilityReps", 0),
  },
  bootstrap: {
    default: 1000,
    // a 95% percentile interval from a few resamples is their spread, not an interval (1 gave "0.15..0.15")
    check: (v) =>
      Number.isInteger(v) && (v === 0 || v >= MIN_BOOTSTRAP)
        ? null
        : `must be 0 (no intervals) or at least ${MIN_BOOTSTRAP} resamples`,
    flag: "--bootstrap <n>",
    help: `bootstrap resamples for recovery CIs (0: no intervals, else at least ${MIN_BOOTSTRAP})`,
    parse: integerText("bootstrap", 0),
  },
  pcaLayer: {
    default: null,
    check: (v, L) =>
      v === null || (Number.isInteger(v) && v >= 0 && (L === undefined || v < L))
        ? null
        : L === undefined
          ? "is not a layer index"
          : `is outside 0..${L - 1}`,
    flag: "--pca-layer <l>",
    help: "layer for low-rank reconstruction (default: first within 5% of the best recovery)",
    parse: integerText("pcaLayer", 0),
    fromCli: (v) => (v === undefined ? null : (v as number)),
  },
  pcaTestFrac: {
    default: 0.5,
    check: (v) => (v > 0 && v < 1 ? null : "must be in (0, 1)"),
    flag: "--pca-test-frac <f>",
    help: "held-out fraction of pairs for PCA recovery",
    parse: numberText("pcaTestFrac"),
  },
  batchPairs: {
    default: 4,
    check: integer(1),
    flag: "--batch <n>",
    help: "pairs per forward batch; when not given, 1 if a model is streamed (each pair of a batch adds its activations to every worker's heap) (default: 4)",
    parse: integerText("batchPairs", 1),
    unsetOnCli: true, // not given: the study's default (1 for streamed models)
  },
  method: {
    default: "exact",
    check: (v) => (METHODS.includes(v) ? null : `must be one of ${METHODS.join(", ")}`),
    flag: "--method <m>",
    help: "how patches are measured: exact patched forwards, attribution (gradient estimates of every patch from one backward pass per model; no controls), or both, with their agreement",
    choices: METHODS,
  },
  window: {
    default: 1,
    check: (v, L) => integer(1)(v) ?? (L !== undefined && v > L ? `is more than the model's ${L} layers` : null),
    flag: "--window <n>",
    help: "patch n consecutive layers together (a patch at layer l covers l … l+n−1): cross-layer effects",
    parse: integerText("window", 1),
  },
  heads: {
    default: false,
    flag: "--heads",
    help: "also patch each attention head (attn.hook_z) on its own: an exact layers × heads grid (the first direction)",
    fromCli: (v) => !!v,
  },
  positionMap: {
    default: false,
    flag: "--position-map",
    help: "also patch each token position on its own at resid_post, for the pair with the largest |gap|: an exact layer × token map",
    fromCli: (v) => !!v,
  },
  format: {
    default: "raw",
    check: (v) => (PAIR_FORMATS.includes(v) ? null : `must be one of ${PAIR_FORMATS.join(", ")}`),
    flag: "--format <f>",
    help: "how text pairs are read: raw (prompt + response as written) or chat (turns rendered through the model's chat_template; the response is what the final assistant turn adds)",
    choices: PAIR_FORMATS,
  },
};

/** The defaults of `prefprobe run` and of runAnalysis (RUN_SETTINGS' defaults). */
export const DEFAULT_SETTINGS: Readonly<RunSettings> = Object.freeze(
  Object.fromEntries(Object.entries(RUN_SETTINGS).map(([k, spec]) => [k, spec.default])) as unknown as RunSettings,
);

/** Defaults filled in for what `partial` leaves out, every value checked (against the model when given). */
export function resolveSettings(
  partial: Partial<RunSettings> = {},
  config?: Pick<LlamaConfig, "numLayers">,
): RunSettings {
  const given = Object.fromEntries(Object.entries(partial).filter(([, v]) => v !== undefined)); // undefined: the default
  for (const k of Object.keys(given)) if (!(k in RUN_SETTINGS)) throw new SettingsError(`unknown setting "${k}"`);
  const s: RunSettings = { ...DEFAULT_SETTINGS, ...given };
  for (const [k, spec] of Object.entries(RUN_SETTINGS) as Array<[keyof RunSettings, SettingSpec<unknown>]>) {
    const wrong = spec.check?.(s[k], config?.numLayers);
    const got = typeof s[k] === "number" ? String(s[k]) : JSON.stringify(s[k]); // NaN is not JSON
    if (wrong) throw new SettingsError(`${k} ${wrong}, got ${got}`);
  }
  return s;
}
