// Greedy decoding with the plain forward pass (no KV cache: the models this runs on are small), optionally with
// hooks (a steering vector, an ablation). Without a cache every step runs the whole sequence so far, so a hook
// sees [1, tokens so far, ...] at each step and edits every position of it, the prompt's included, every time.
import * as tf from "@tensorflow/tfjs-core";
import { readValues } from "./read.js";
import { forward, type Hooks, type LlamaModel } from "./llama.js";

export interface GenerateOptions {
  /** Token ids that end the continuation (not included in it), e.g. the model's EOS. */
  stopAt?: number[];
  /** Hooks applied in every step's forward pass. */
  hooks?: Hooks;
}

/**
 * Appends up to `steps` argmax tokens to `prompt` and returns only the new ids; stops early at any id in
 * `stopAt`. The fourth argument is the options, or (as before) the stopAt list itself.
 */
export function greedy(
  model: LlamaModel,
  prompt: number[],
  steps: number,
  opts: GenerateOptions | number[] = {},
): number[] {
  const { stopAt = [], hooks } = Array.isArray(opts) ? { stopAt: opts } : opts;
  if (!(Number.isInteger(steps) && steps >= 0))
    throw new RangeError(`steps must be a non-negative integer, got ${steps}`);
  const ids = [...prompt];
  const out: number[] = [];
  for (let s = 0; s < steps; s++) {
    const { logits } = forward(model, [ids], { logitsAt: [[0, ids.length - 1]], hooks });
    let next: number;
    try {
      next = readValues(() => tf.argMax(logits!, -1))[0]!;
    } finally {
      logits!.dispose();
    }
    if (stopAt.includes(next)) break;
    ids.push(next);
    out.push(next);
  }
  return out;
}
