// Activation patching between two models run on the same tokens. A patch kind is one function with one
// signature, (h_dst, h_src, mask) → new activation; the direction decides which model is patched and how
// the gain is read (the sweep builds the runs, the engine runs them).
import * as tf from "@tensorflow/tfjs-core";
import { hookName, type HookName } from "../model/hooks.js";
import type { Direction, Site } from "./settings.js";

/**
 * A patch: the activation to run with instead of h_dst [B, T, H], given the other model's h_src on the same
 * tokens and a position mask [B, T, 1] (1 = patch here). Returns a new tensor; the inputs are not consumed.
 */
export type Patch = (hDst: tf.Tensor, hSrc: tf.Tensor, mask: tf.Tensor) => tf.Tensor;

/** h_dst + α·mask·(target − h_dst): move toward `target` where mask is 1. */
function toward(hDst: tf.Tensor, target: tf.Tensor, mask: tf.Tensor, alpha: number): tf.Tensor {
  return tf.tidy(() => tf.add(hDst, tf.mul(tf.mul(tf.sub(target, hDst), mask), alpha)));
}

/** The real patch: h_dst + α (h_src − h_dst). */
export const interpolate =
  (alpha: number): Patch =>
  (hDst, hSrc, mask) =>
    toward(hDst, hSrc, mask, alpha);

/** Control: h_dst plus α times a random direction (`noise` [B, T, H] normalized per position) with the norm of h_src − h_dst. */
export const randomDirection =
  (alpha: number, noise: tf.Tensor): Patch =>
  (hDst, hSrc, mask) =>
    tf.tidy(() => {
      const norm = tf.norm(tf.sub(hSrc, hDst), 2, -1, true);
      const unit = tf.div(noise, tf.maximum(tf.norm(noise, 2, -1, true), 1e-12));
      return tf.add(hDst, tf.mul(tf.mul(tf.mul(unit, norm), mask), alpha));
    });

/** Control: h_dst + α (μ − h_dst), μ [H] the source model's dataset-mean activation at the site (h_src unused). */
export const meanAblation =
  (alpha: number, mu: tf.Tensor1D): Patch =>
  (hDst, _hSrc, mask) =>
    tf.tidy(() => toward(hDst, tf.mul(tf.onesLike(hDst), mu), mask, alpha));

/** Low-rank patch: h_dst + α (h_src − h_dst) UᵀU, the difference projected onto the rows of U [k, H]. */
export const subspace =
  (alpha: number, U: tf.Tensor2D): Patch =>
  (hDst, hSrc, mask) =>
    tf.tidy(() => {
      const H = hDst.shape[hDst.shape.length - 1]!;
      const diff = tf.reshape(tf.sub(hSrc, hDst), [-1, H]);
      const projected = tf.add(hDst, tf.reshape(tf.matMul(tf.matMul(diff, U, false, true), U), hDst.shape));
      return toward(hDst, projected, mask, alpha);
    });

/** Which model is run (dst) and which one the activations come from (src). */
export function roles(direction: Direction): { dst: "base" | "tuned"; src: "base" | "tuned" } {
  return direction === "tuned->base" ? { dst: "base", src: "tuned" } : { dst: "tuned", src: "base" };
}

/**
 * The gain of a patch from the patched model's margin: how far it moved toward the tuned model's margin.
 * tuned->base: m_patched − m_base; base->tuned: m_tuned − m_patched (how much the patch took away).
 */
export function gainOf(direction: Direction, patched: number, marginBase: number, marginTuned: number): number {
  return direction === "tuned->base" ? patched - marginBase : marginTuned - patched;
}

/** The layers a patch at `layer` covers with windows of `window` layers, cut at the last of L layers. */
export const windowLayers = (layer: number, window: number, L: number): number[] =>
  Array.from({ length: Math.max(1, Math.min(window, L - layer)) }, (_, i) => layer + i);

/** Sites a patch at (site, layer) needs cached from the model being patched, the site itself first. */
export function sitesNeeded(site: Site, layer: number): HookName[] {
  return site === "attn_out" || site === "mlp_out"
    ? [hookName(site, layer), hookName("resid_pre", layer)]
    : [hookName(site, layer)];
}
