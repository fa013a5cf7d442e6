// Loads a Hugging Face Llama folder (config.json + safetensors, single or sharded) into a LlamaModel,
// checking every tensor's name and shape against the config, and writes a model back out.
import * as fs from "node:fs";
import * as path from "node:path";
import * as tf from "@tensorflow/tfjs-core";
import { configToJson } from "../model/config.js";
import { ensureBackend } from "../model/backend.js";
import { loadConfig } from "./config.js";
import { iterSafetensorsFolder, writeSafetensors, type DType, type TensorToWrite } from "./safetensors.js";
import type { LlamaLayer, LlamaModel } from "../model/llama.js";
import { LAYER_NAMES, expectedTensors, isMatrixName, namedWeights, transposeData, weightBytes, type LayerKey } from "../model/weights.js";

/** A model folder whose weights do not match what its config describes. */
export class ModelError extends Error {
  override name = "ModelError";
}

/** Index of the first NaN or ±Infinity in `x`, or −1. */
export function firstNonFinite(x: Float32Array): number {
  for (let i = 0; i < x.length; i++) if (!Number.isFinite(x[i]!)) return i;
  return -1;
}

/** Largest model (float32 weight bytes) the wasm backend is allowed to load; its heap is 4 GiB in all. */
export const WASM_WEIGHT_LIMIT = 3 * 2 ** 30;

/** Loads a Hugging Face Llama folder (config.json + safetensors), starting the best tfjs backend if none is running. */
export async function loadModel(dir: string): Promise<LlamaModel> {
  await ensureBackend();
  return loadModelSync(dir);
}

/** Loads a Hugging Face Llama folder onto the current tfjs backend. */
export function loadModelSync(dir: string): LlamaModel {
  if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) throw new ModelError(`${dir}: not a folder`);
  const cfg = loadConfig(dir);
  const need = weightBytes(cfg);
  if (tf.getBackend() === "wasm" && need > WASM_WEIGHT_LIMIT) {
    throw new ModelError(
      `${dir}: the weights need ${(need / 2 ** 30).toFixed(2)} GiB as float32, more than the wasm backend's 4 GiB heap can hold with activations; install @tensorflow/tfjs-node to run it`,
    );
  }
  const expected = expectedTensors(cfg);
  const got = new Map<string, tf.Tensor>();
  let tiedHead: tf.Tensor | null = null;
  try {
    for (const [name, t] of iterSafetensorsFolder(dir)) {
      if (name.endsWith("rotary_emb.inv_freq")) continue; // recomputed from the config
      if (name === "lm_head.weight" && cfg.tieWordEmbeddings) continue; // tied: the embedding is the head
      const shape = expected.get(name);
      if (!shape) throw new ModelError(`${dir}: unexpected tensor "${name}" (not part of a Llama model with this config)`);
      if (!tf.util.arraysEqual(shape, t.shape)) throw new ModelError(`${dir}: tensor "${name}" has shape [${t.shape}], config implies [${shape}]`);
      if (!(t.data instanceof Float32Array)) throw new ModelError(`${dir}: tensor "${name}" has dtype ${t.dtype}; weights must be F32, F16 or BF16`);
      const bad = firstNonFinite(t.data);
      if (bad >= 0) throw new ModelError(`${dir}: tensor "${name}" holds ${t.data[bad]} at flat index ${bad}: the weights are corrupt (NaN/Inf)`);
      if (isMatrixName(name)) got.set(name, tf.tensor(transposeData(t.data, shape[0]!, shape[1]!), [shape[1]!, shape[0]!], "float32"));
      else got.set(name, tf.tensor(t.data, shape, "float32"));
      if (name === "model.embed_tokens.weight" && cfg.tieWordEmbeddings) tiedHead = tf.tensor(transposeData(t.data, shape[0]!, shape[1]!), [shape[1]!, shape[0]!], "float32");
    }
    for (const name of expected.keys()) if (!got.has(name)) throw new ModelError(`${dir}: missing tensor "${name}"`);
  } catch (e) {
    for (const t of got.values()) t.dispose();
    tiedHead?.dispose();
    throw e;
  }
  const w = (n: string) => got.get(n)!;
  const layers: LlamaLayer[] = [];
  for (let l = 0; l < cfg.numLayers; l++) {
    const p: Partial<Record<LayerKey, tf.Tensor>> = {};
    for (const [k, suffix] of Object.entries(LAYER_NAMES)) {
      const t = got.get(`model.layers.${l}.${suffix}`);
      if (t) p[k as LayerKey] = t;
    }
    layers.push(p as unknown as LlamaLayer);
  }
  const embed = w("model.embed_tokens.weight") as tf.Tensor2D;
  return {
    config: cfg,
    embed,
    layers,
    finalNorm: w("model.norm.weight") as tf.Tensor1D,
    lmHead: (tiedHead ?? w("lm_head.weight")) as tf.Tensor2D,
  };
}

/** Writes config.json and model.safetensors for a model (F32 by default, or BF16/F16). */
export function saveModel(model: LlamaModel, dir: string, dtype: Extract<DType, "F32" | "BF16" | "F16"> = "F32"): void {
  fs.mkdirSync(dir, { recursive: true });
  const tensors: Record<string, TensorToWrite> = {};
  for (const [name, t] of namedWeights(model)) tensors[name] = { dtype, ...t };
  writeSafetensors(path.join(dir, "model.safetensors"), tensors, { format: "pt" });
  const torchDtype = { F32: "float32", BF16: "bfloat16", F16: "float16" }[dtype];
  writeFileAtomic(path.join(dir, "config.json"), JSON.stringify(configToJson(model.config, torchDtype), null, 2) + "\n");
}

/**
 * Writes a complete model folder (config, weights, tokenizer files and licence copied from `copyFrom`, any
 * extra files) into a temporary sibling, then moves it into place, replacing `dir`: never a half-written model.
 */
export function saveModelFolder(model: LlamaModel, dir: string, opts: { copyFrom?: string; extraFiles?: Record<string, string> } = {}): void {
  const tmp = `${dir}.tmp-${process.pid}`;
  fs.rmSync(tmp, { recursive: true, force: true });
  try {
    saveModel(model, tmp);
    for (const f of ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "LICENSE"]) {
      const src = opts.copyFrom ? path.join(opts.copyFrom, f) : "";
      if (src && fs.existsSync(src)) fs.copyFileSync(src, path.join(tmp, f));
    }
    for (const [name, text] of Object.entries(opts.extraFiles ?? {})) fs.writeFileSync(path.join(tmp, name), text);
    fs.rmSync(dir, { recursive: true, force: true });
    fs.renameSync(tmp, dir);
  } catch (e) {
    fs.rmSync(tmp, { recursive: true, force: true });
    throw e;
  }
}

/** Writes a text file through a temporary file and a rename, so it is never half-written. */
export function writeFileAtomic(file: string, text: string | Uint8Array): void {
  const tmp = `${file}.tmp-${process.pid}`;
  fs.writeFileSync(tmp, text);
  fs.renameSync(tmp, file);
}

