// Hook sites: the names of the activations the forward pass exposes (TransformerLens's names), and the cache
// that holds the ones a caller asked to keep.
import * as tf from "@tensorflow/tfjs-core";
import type { LlamaConfig } from "./config.js";

/** A per-layer site, as it appears after `blocks.{l}.`: the residual stream, the block outputs, per-head z. */
export type BlockSite = "resid_pre" | "z" | "attn_out" | "resid_mid" | "mlp_out" | "resid_post";

/** Every hook site name: `hook_embed`, `blocks.{l}.hook_{site}` / `blocks.{l}.attn.hook_z`, `ln_final.hook_normalized`. */
export type HookName =
  | "hook_embed"
  | `blocks.${number}.hook_${"resid_pre" | "attn_out" | "resid_mid" | "mlp_out" | "resid_post"}`
  | `blocks.${number}.attn.hook_z`
  | "ln_final.hook_normalized";

/** Per-layer sites in the order the forward pass visits them. */
export const BLOCK_SITES: readonly BlockSite[] = ["resid_pre", "z", "attn_out", "resid_mid", "mlp_out", "resid_post"];

/** The hook name of a site at a layer: hookName("resid_post", 3) = "blocks.3.hook_resid_post"; "z" → "blocks.3.attn.hook_z". */
export function hookName(site: BlockSite, layer: number): HookName {
  if (!(Number.isInteger(layer) && layer >= 0))
    throw new RangeError(`hookName: layer must be a non-negative integer, got ${layer}`);
  return site === "z" ? `blocks.${layer}.attn.hook_z` : `blocks.${layer}.hook_${site}`;
}

/** Every hook site of a model, in the order one forward pass visits them. */
export function hookNames(config: Pick<LlamaConfig, "numLayers">): HookName[] {
  const out: HookName[] = ["hook_embed"];
  for (let l = 0; l < config.numLayers; l++) for (const s of BLOCK_SITES) out.push(hookName(s, l));
  out.push("ln_final.hook_normalized");
  return out;
}

/** Whether a string is a hook site name. Shapes: `attn.hook_z` is [B, T, heads, head_dim], every other site [B, T, hidden]. */
export const isHookName = (name: string): name is HookName =>
  name === "hook_embed" ||
  name === "ln_final.hook_normalized" ||
  /^blocks\.\d+\.(hook_(resid_pre|attn_out|resid_mid|mlp_out|resid_post)|attn\.hook_z)$/.test(name);

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
