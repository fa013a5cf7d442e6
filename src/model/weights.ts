// A model's weights by Hugging Face name: which tensors a config implies, their layout in LlamaModel
// ([in, out] matrices), and models that share weights with another but for a few.
import * as tf from "@tensorflow/tfjs-core";
import type { LlamaConfig } from "./config.js";
import type { LlamaLayer, LlamaModel } from "./llama.js";

export type LayerKey = keyof LlamaLayer;

/** Layer fields that are matrices: stored [in, out] in the model, [out, in] on disk. */
export const MATRICES = new Set<LayerKey>(["q", "k", "v", "o", "gate", "up", "down"]);

/** Row-major [rows, cols] → [cols, rows]. */
export function transposeData(data: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(data.length);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[c * rows + r] = data[r * cols + c]!;
  return out;
}

export const isMatrixName = (name: string) =>
  name === "lm_head.weight" ||
  [...MATRICES].some((k) => name.startsWith("model.layers.") && name.endsWith(LAYER_NAMES[k]));

/** Hugging Face tensor name suffix (under model.layers.{l}.) for each LlamaLayer field. */
export const LAYER_NAMES: Record<LayerKey, string> = {
  inputNorm: "input_layernorm.weight",
  q: "self_attn.q_proj.weight",
  k: "self_attn.k_proj.weight",
  v: "self_attn.v_proj.weight",
  o: "self_attn.o_proj.weight",
  qBias: "self_attn.q_proj.bias",
  kBias: "self_attn.k_proj.bias",
  vBias: "self_attn.v_proj.bias",
  oBias: "self_attn.o_proj.bias",
  postNorm: "post_attention_layernorm.weight",
  gate: "mlp.gate_proj.weight",
  up: "mlp.up_proj.weight",
  down: "mlp.down_proj.weight",
  gateBias: "mlp.gate_proj.bias",
  upBias: "mlp.up_proj.bias",
  downBias: "mlp.down_proj.bias",
};

/** Every tensor name a config implies, with its expected shape. */
export function expectedTensors(cfg: LlamaConfig): Map<string, number[]> {
  const { hiddenSize: H, intermediateSize: I, numHeads: nH, numKvHeads: nKv, headDim: d, vocabSize: V } = cfg;
  const m = new Map<string, number[]>();
  m.set("model.embed_tokens.weight", [V, H]);
  for (let l = 0; l < cfg.numLayers; l++) {
    const shapes: Partial<Record<LayerKey, number[]>> = {
      inputNorm: [H],
      q: [nH * d, H],
      k: [nKv * d, H],
      v: [nKv * d, H],
      o: [H, nH * d],
      postNorm: [H],
      gate: [I, H],
      up: [I, H],
      down: [H, I],
    };
    if (cfg.attentionBias) Object.assign(shapes, { qBias: [nH * d], kBias: [nKv * d], vBias: [nKv * d], oBias: [H] });
    if (cfg.mlpBias) Object.assign(shapes, { gateBias: [I], upBias: [I], downBias: [H] });
    for (const [k, s] of Object.entries(shapes)) m.set(`model.layers.${l}.${LAYER_NAMES[k as LayerKey]}`, s);
  }
  m.set("model.norm.weight", [H]);
  if (!cfg.tieWordEmbeddings) m.set("lm_head.weight", [V, H]);
  return m;
}

/** Float32 bytes the weights of a config take once loaded. */
export function weightBytes(cfg: LlamaConfig): number {
  let n = 0;
  for (const s of expectedTensors(cfg).values()) n += s.reduce((a, b) => a * b, 1);
  return n * 4;
}

/** The model's weights by Hugging Face name and in Hugging Face layout (tied models omit lm_head.weight). */
export function namedWeights(model: LlamaModel): Map<string, { shape: number[]; data: Float32Array }> {
  return new Map(
    weightRefs(model).map(({ name, tensor: t, matrix }) => {
      const data = t.dataSync() as Float32Array;
      if (!matrix) return [name, { shape: t.shape, data: Float32Array.from(data) }];
      return [name, { shape: [t.shape[1]!, t.shape[0]!], data: transposeData(data, t.shape[0]!, t.shape[1]!) }];
    }),
  );
}

/** Throws for a streamed model: `what` needs every weight on the backend. */
export function residentOnly(model: LlamaModel, what: string): void {
  if (model.source)
    throw new Error(
      `${what} needs every weight of the model on the backend; this one is streamed (load it with a memory budget that holds it)`,
    );
}

/** One weight of a loaded model: its Hugging Face name, tensor, and whether it is a matrix stored [in, out]. */
export interface WeightRef {
  name: string;
  tensor: tf.Tensor;
  matrix: boolean;
}

/** Every weight of a model by Hugging Face name (the head only when untied). */
export function weightRefs(model: LlamaModel): WeightRef[] {
  residentOnly(model, "listing its weights");
  const refs: WeightRef[] = [{ name: "model.embed_tokens.weight", tensor: model.embed, matrix: false }];
  model.layers.forEach((p, l) => {
    for (const [k, t] of Object.entries(p))
      if (t)
        refs.push({
          name: `model.layers.${l}.${LAYER_NAMES[k as LayerKey]}`,
          tensor: t as tf.Tensor,
          matrix: MATRICES.has(k as LayerKey),
        });
  });
  refs.push({ name: "model.norm.weight", tensor: model.finalNorm, matrix: false });
  if (!model.config.tieWordEmbeddings) refs.push({ name: "lm_head.weight", tensor: model.lmHead, matrix: true });
  return refs;
}

/**
 * A model sharing every weight of `model` except those named in `replace` (Hugging Face names, values in
 * the model's own layout). With tied embeddings a new embedding also becomes the head.
 */
export function withWeights(model: LlamaModel, replace: Map<string, tf.Tensor>): LlamaModel {
  residentOnly(model, "replacing its weights");
  const layers = model.layers.map((p, l) => {
    const q: Record<string, tf.Tensor | undefined> = { ...p };
    for (const k of Object.keys(p)) {
      const t = replace.get(`model.layers.${l}.${LAYER_NAMES[k as LayerKey]}`);
      if (t) q[k] = t;
    }
    return q as unknown as LlamaLayer<tf.Tensor2D>;
  });
  const embed = (replace.get("model.embed_tokens.weight") ?? model.embed) as tf.Tensor2D;
  const tiedHead =
    model.config.tieWordEmbeddings && replace.has("model.embed_tokens.weight")
      ? (tf.transpose(embed) as tf.Tensor2D)
      : null;
  return {
    config: model.config,
    embed,
    layers,
    finalNorm: (replace.get("model.norm.weight") ?? model.finalNorm) as tf.Tensor1D,
    lmHead: tiedHead ?? ((replace.get("lm_head.weight") ?? model.lmHead) as tf.Tensor2D),
  };
}
