// The residual stream as one tensor: index 0 = embedding output, index l+1 = after block l (before final norm).
import * as tf from "@tensorflow/tfjs-core";
import type { HookName } from "./hooks.js";
import { forward, type LlamaModel } from "./llama.js";

/** The L+1 site names whose values make up the residual stream, in order. */
export function residSites(numLayers: number): HookName[] {
  return ["hook_embed", ...Array.from({ length: numLayers }, (_, l): HookName => `blocks.${l}.hook_resid_post`)];
}

/** Logits [T, V] of one sequence and, when asked, the residual stream [L+1, T, H]. Caller disposes. */
export function logitsAndResid(
  model: LlamaModel,
  ids: number[],
  withResid: boolean,
): { logits: tf.Tensor2D; resid: tf.Tensor3D | null } {
  const sites = withResid ? residSites(model.config.numLayers) : [];
  const { logits, cache } = forward(model, [ids], { cache: sites });
  const l2 = tf.tidy(() => tf.squeeze(logits!, [0]) as tf.Tensor2D);
  logits!.dispose();
  if (!withResid) return { logits: l2, resid: null };
  const resid = tf.tidy(() => tf.concat(sites.map((s) => cache.get(s))) as tf.Tensor3D);
  cache.dispose();
  return { logits: l2, resid };
}
