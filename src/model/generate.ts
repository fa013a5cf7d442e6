// Greedy decoding with the plain forward pass (no KV cache: the models this runs on are small).
import * as tf from "@tensorflow/tfjs-core";
import { readValues } from "./read.js";
import { forward, type LlamaModel } from "./llama.js";

/** Appends `steps` argmax tokens to `prompt`; stops early at any id in `stopAt`. Returns only the new ids. */
export function greedy(model: LlamaModel, prompt: number[], steps: number, stopAt: number[] = []): number[] {
  const ids = [...prompt];
  const out: number[] = [];
  for (let s = 0; s < steps; s++) {
    const { logits } = forward(model, [ids], { logitsAt: [[0, ids.length - 1]] });
    const next = readValues(() => tf.argMax(logits!, -1))[0]!;
    logits!.dispose();
    if (stopAt.includes(next)) break;
    ids.push(next);
    out.push(next);
  }
  return out;
}
