// A streamed model's weights: kept in Node memory in their file dtype (BF16 takes half of float32), brought
// into the backend a layer at a time, as many layers kept as the budget allows (least recently used leave first).
import * as tf from "@tensorflow/tfjs-core";
import type { LlamaConfig } from "../model/config.js";
import type { LlamaLayer, WeightSource } from "../model/llama.js";
import { LAYER_NAMES, expectedTensors, isMatrixName, transposeData, type LayerKey } from "../model/weights.js";
import { DTYPE_BYTES, decode, type RawTensor } from "./safetensors.js";

/** A budget that cannot hold what streaming needs at the least. */
export class StreamError extends Error {
  override name = "StreamError";
}

export class StreamedWeights implements WeightSource {
  /** Layers on the backend, least recently used first. */
  private readonly resident = new Map<number, LlamaLayer>();
  /** Float32 bytes of one layer on the backend. */
  readonly layerBytes: number;
  /** How often a layer was brought in, and sent back out. */
  readonly stats = { loads: 0, evictions: 0 };

  constructor(
    readonly cfg: LlamaConfig,
    private readonly raw: Map<string, RawTensor>,
    /** Float32 bytes the layers may take on the backend. */
    readonly budget: number,
  ) {
    this.layerBytes = 0;
    for (const [name, shape] of expectedTensors(cfg)) if (name.startsWith("model.layers.0.")) this.layerBytes += 4 * shape.reduce((a, b) => a * b, 1);
    if (budget < this.layerBytes) throw new StreamError(`a memory budget that leaves ${(budget / 2 ** 20).toFixed(0)} MiB for layers cannot hold one layer (${(this.layerBytes / 2 ** 20).toFixed(0)} MiB) beside the head`);
  }

  /** How many layers the budget keeps on the backend at once. */
  get capacity(): number {
    return Math.min(this.cfg.numLayers, Math.floor(this.budget / this.layerBytes));
  }

  layer(l: number): LlamaLayer {
    const hit = this.resident.get(l);
    if (hit) {
      this.resident.delete(l); // most recently used goes last
      this.resident.set(l, hit);
      return hit;
    }
    while (this.resident.size >= this.capacity) {
      const [oldest, p] = this.resident.entries().next().value as [number, LlamaLayer];
      this.resident.delete(oldest);
      for (const t of Object.values(p)) (t as tf.Tensor).dispose();
      this.stats.evictions++;
    }
    const p: Partial<Record<LayerKey, tf.Tensor>> = {};
    for (const [k, suffix] of Object.entries(LAYER_NAMES)) {
      const name = `model.layers.${l}.${suffix}`;
      const t = this.raw.get(name);
      if (!t) continue; // optional biases
      const data = decode(t.dtype, t.bytes) as Float32Array;
      // kept: the forward pass asks for a layer inside a tf.tidy scope, which must not free it
      p[k as LayerKey] = tf.keep(isMatrixName(name) ? tf.tensor(transposeData(data, t.shape[0]!, t.shape[1]!), [t.shape[1]!, t.shape[0]!], "float32") : tf.tensor(data, t.shape, "float32"));
    }
    this.stats.loads++;
    const layer = p as unknown as LlamaLayer;
    this.resident.set(l, layer);
    return layer;
  }

  embedRows(ids: number[]): tf.Tensor2D {
    const t = this.raw.get("model.embed_tokens.weight")!;
    const H = this.cfg.hiddenSize;
    const rowBytes = H * DTYPE_BYTES[t.dtype];
    const out = new Float32Array(ids.length * H);
    ids.forEach((id, i) => out.set(decode(t.dtype, t.bytes.subarray(id * rowBytes, (id + 1) * rowBytes)) as Float32Array, i * H));
    return tf.tensor2d(out, [ids.length, H]);
  }

  dispose(): void {
    for (const p of this.resident.values()) for (const t of Object.values(p)) (t as tf.Tensor).dispose();
    this.resident.clear();
  }
}
