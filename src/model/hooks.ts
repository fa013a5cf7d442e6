// Hook sites: the names of the activations the forward pass exposes (TransformerLens's names), and the cache
// that holds the ones a caller asked to keep.
import * as tf from "@tensorflow/tfjs-core";
import type { LlamaConfig } from "./config.js";

/**
 * Every per-layer site: its short name (TransformerLens's `get_act_name` aliases) → its name after `blocks.{l}.`,
 * in the order a forward pass visits them. The one list hook names, hookName, isHookName and hookNames come
 * from (and the analysis's patch sites, analysis/settings.ts, are checked against). Shapes, with B rows of T
 * tokens, nH/nKv query/key-value heads of head_dim d and I = intermediate:
 *   resid_pre, attn_out, resid_mid, mlp_out, resid_post [B, T, hidden];
 *   q, rot_q, z [B, T, nH, d]; k, rot_k, v [B, T, nKv, d] (grouped-query k and v per kv head, as TransformerLens
 *   keeps them unless told to ungroup); q and k before RoPE, rot_q and rot_k after it;
 *   attn_scores, pattern [B, nH, Tq, Tk]: q·kᵀ/√d plus the additive mask (−1e9 where a query may not look, so
 *   those entries hold score − 1e9), and its softmax (exactly 0 there);
 *   pre (gate projection, before SiLU), pre_linear (up projection), post (silu(pre) · pre_linear, what
 *   down_proj reads) [B, T, I].
 */
const LAYER_HOOKS = {
  resid_pre: "hook_resid_pre",
  q: "attn.hook_q",
  k: "attn.hook_k",
  v: "attn.hook_v",
  rot_q: "attn.hook_rot_q",
  rot_k: "attn.hook_rot_k",
  attn_scores: "attn.hook_attn_scores",
  pattern: "attn.hook_pattern",
  z: "attn.hook_z",
  attn_out: "hook_attn_out",
  resid_mid: "hook_resid_mid",
  pre: "mlp.hook_pre",
  pre_linear: "mlp.hook_pre_linear",
  post: "mlp.hook_post",
  mlp_out: "hook_mlp_out",
  resid_post: "hook_resid_post",
} as const;

/** Any per-layer site by its short name: hookName(site, l) is `blocks.{l}.` + its hook. */
export type LayerSite = keyof typeof LAYER_HOOKS;

/** The residual stream, the block outputs and per-head z: the per-layer sites patching sweeps go over. */
export type BlockSite = "resid_pre" | "z" | "attn_out" | "resid_mid" | "mlp_out" | "resid_post";

/** Per-layer sites in the order the forward pass visits them (the finer ones are INNER_SITES). */
export const BLOCK_SITES: readonly BlockSite[] = ["resid_pre", "z", "attn_out", "resid_mid", "mlp_out", "resid_post"];

/** TransformerLens's finer sites inside attention and the MLP. */
export type InnerSite = Exclude<LayerSite, BlockSite>;

/**
 * The finer sites in forward order; as every site, each costs nothing unless a hook or the cache asks for it.
 * The per-position ones are intermediates the pass makes anyway; watching a layer's attn_scores or pattern runs
 * that layer's attention batched, with the whole [B, nH, T, T] at once (forward's `attention`, `pairedPrompts`).
 */
export const INNER_SITES: readonly InnerSite[] = [
  "q",
  "k",
  "v",
  "rot_q",
  "rot_k",
  "attn_scores",
  "pattern",
  "pre",
  "pre_linear",
  "post",
];

/** Every hook site name: `hook_embed`, `blocks.{l}.` + a per-layer site's hook, `ln_final.hook_normalized`. */
export type HookName =
  "hook_embed" | `blocks.${number}.${(typeof LAYER_HOOKS)[LayerSite]}` | "ln_final.hook_normalized";

/**
 * The hook name of a site at a layer: hookName("resid_post", 3) = "blocks.3.hook_resid_post"; "pattern" →
 * "blocks.3.attn.hook_pattern". Typed by its site, so that `{ [hookName("mlp_out", l)]: (v) => … }` types `v`.
 */
export function hookName<S extends LayerSite>(site: S, layer: number): `blocks.${number}.${(typeof LAYER_HOOKS)[S]}` {
  if (!(Number.isInteger(layer) && layer >= 0))
    throw new RangeError(`hookName: layer must be a non-negative integer, got ${layer}`);
  const hook = Object.hasOwn(LAYER_HOOKS, site) ? LAYER_HOOKS[site] : undefined;
  if (!hook)
    throw new RangeError(`hookName: unknown site "${String(site)}" (one of ${Object.keys(LAYER_HOOKS).join(", ")})`);
  return `blocks.${layer}.${hook}`;
}

/** Every hook site of a model, in the order one forward pass visits them. */
export function hookNames(config: Pick<LlamaConfig, "numLayers">): HookName[] {
  const out: HookName[] = ["hook_embed"];
  for (let l = 0; l < config.numLayers; l++)
    for (const s of Object.keys(LAYER_HOOKS) as LayerSite[]) out.push(hookName(s, l));
  out.push("ln_final.hook_normalized");
  return out;
}

/** `blocks.{l}.` and any per-layer site's hook. */
const LAYER_HOOK_NAME = new RegExp(
  `^blocks\\.\\d+\\.(${Object.values(LAYER_HOOKS)
    .map((h) => h.replace(".", "\\."))
    .join("|")})$`,
);

/** Whether a string is a hook site name (of some model: the layer is checked against a model by forward). */
export const isHookName = (name: string): name is HookName =>
  name === "hook_embed" || name === "ln_final.hook_normalized" || LAYER_HOOK_NAME.test(name);

/**
 * Activations kept by one forward call. The caller owns them: read with `get`, free them all with `dispose()`
 * (or take one out with `take`, which hands its ownership over).
 */
export class ActivationCache {
  private readonly values = new Map<string, tf.Tensor>();

  /** Stores a tensor under a site name (the cache takes ownership). */
  set(name: string, value: tf.Tensor): void {
    this.values.get(name)?.dispose();
    this.values.set(name, value);
  }

  /** The cached value of a site; throws when the site was not cached. */
  get(name: HookName | string): tf.Tensor {
    const v = this.values.get(name);
    if (!v) throw new Error(`site ${name} was not cached (cached: ${[...this.values.keys()].join(", ") || "none"})`);
    return v;
  }

  has(name: HookName | string): boolean {
    return this.values.has(name);
  }

  /** Names of the cached sites, in the order they were computed. */
  names(): string[] {
    return [...this.values.keys()];
  }

  get size(): number {
    return this.values.size;
  }

  /** Removes a site from the cache and returns it: the caller now owns (and disposes) it. */
  take(name: HookName | string): tf.Tensor {
    const v = this.get(name);
    this.values.delete(name);
    return v;
  }

  /** Frees every tensor still in the cache. */
  dispose(): void {
    for (const v of this.values.values()) v.dispose();
    this.values.clear();
  }
}
