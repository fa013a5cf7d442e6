// Layer-wide activation patching between two models run on the same tokens.
import * as tf from "@tensorflow/tfjs-core";
import { forward, type LlamaModel } from "../model/llama.js";
import type { PairBatch } from "./batch.js";

/** Where to patch: a per-layer hook site. */
export type Site = "resid_post" | "resid_pre" | "attn_out" | "mlp_out";
export const SITES: readonly Site[] = ["resid_post", "resid_pre", "attn_out", "mlp_out"];

/** tuned->base: run the base model with the tuned model's activations patched in; base->tuned the reverse. */
export type Direction = "tuned->base" | "base->tuned";

/** The hook-site name of a site at a layer, e.g. blocks.3.hook_resid_post. */
export const hookName = (site: Site, layer: number): string => `blocks.${layer}.hook_${site}`;

/** Sites a patch at (site, layer) needs cached from the model being patched, besides the site itself. */
export function sitesNeeded(site: Site, layer: number): string[] {
  return site === "attn_out" || site === "mlp_out" ? [hookName(site, layer), hookName("resid_pre", layer)] : [hookName(site, layer)];
}

/** h_dst + α·mask·(h_src − h_dst): the source's activation mixed in where mask is 1. */
export function mixPatch(hDst: tf.Tensor, hSrc: tf.Tensor, mask: tf.Tensor, alpha: number): tf.Tensor {
  return tf.tidy(() => tf.add(hDst, tf.mul(tf.mul(tf.sub(hSrc, hDst), mask), alpha)));
}

/** Control: h_dst plus a random direction with the same per-position norm as α·(h_src − h_dst). */
export function randomPatch(hDst: tf.Tensor, hSrc: tf.Tensor, mask: tf.Tensor, alpha: number, seed: number): tf.Tensor {
  return tf.tidy(() => {
    const norm = tf.norm(tf.sub(hSrc, hDst), 2, -1, true);
    const r = tf.randomNormal(hDst.shape, 0, 1, "float32", seed);
    const unit = tf.div(r, tf.maximum(tf.norm(r, 2, -1, true), 1e-12));
    return tf.add(hDst, tf.mul(tf.mul(tf.mul(unit, norm), mask), alpha));
  });
}

/**
 * Runs `dst` on the batch with `site` at `layer` replaced by `value`, reusing cached activations: a residual
 * patch resumes from the patched residual, an attn_out/mlp_out patch resumes from the cached resid_pre of
 * that layer. Returns logits at the batch's response positions.
 */
export function runPatched(dst: LlamaModel, batch: PairBatch, site: Site, layer: number, value: tf.Tensor, dstCache: Record<string, tf.Tensor>): tf.Tensor {
  const common = { lengths: batch.lengths, logitsAt: batch.logitsAt };
  let r;
  if (site === "resid_post") r = forward(dst, batch.ids, { ...common, start: { layer: layer + 1, resid: value } });
  else if (site === "resid_pre") r = forward(dst, batch.ids, { ...common, start: { layer, resid: value } });
  else {
    const start = dstCache[hookName("resid_pre", layer)];
    if (!start) throw new Error(`runPatched: ${hookName("resid_pre", layer)} was not cached`);
    r = forward(dst, batch.ids, { ...common, start: { layer, resid: start }, hooks: { [hookName(site, layer)]: () => value } });
  }
  return r.logits!;
}
