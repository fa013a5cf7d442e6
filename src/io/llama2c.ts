// Converts a llama2.c checkpoint (legacy format) and its tokenizer into a Hugging Face Llama folder:
// config.json, model.safetensors (F32), tokenizer.json and tokenizer_config.json.
import * as fs from "node:fs";
import * as path from "node:path";
import { configToJson, type LlamaConfig } from "../model/config.js";
import { writeSafetensors, type TensorToWrite } from "./safetensors.js";
import { writeFileAtomic } from "./model.js";

/** A llama2.c file that does not have the expected layout. */
export class Llama2cError extends Error {
  override name = "Llama2cError";
}

/** The seven int32 header fields of a llama2.c checkpoint. */
export interface Llama2cHeader {
  dim: number;
  hiddenDim: number;
  nLayers: number;
  nHeads: number;
  nKvHeads: number;
  vocabSize: number; // absolute value; `shared` tells whether the classifier is the embedding
  seqLen: number;
  shared: boolean;
}

/** Reads a llama2.c checkpoint: header plus HF-named float32 tensors (wq/wk rows permuted to HF's layout). */
export function readLlama2cCheckpoint(file: string): { header: Llama2cHeader; tensors: Record<string, TensorToWrite> } {
  let buf: Buffer;
  try {
    buf = fs.readFileSync(file);
  } catch (e) {
    throw new Llama2cError(`${file}: cannot read (${(e as NodeJS.ErrnoException).code ?? String(e)})`);
  }
  if (buf.length < 28) throw new Llama2cError(`${file}: too short for a llama2.c header`);
  const h = Array.from({ length: 7 }, (_, i) => buf.readInt32LE(i * 4));
  const [dim, hiddenDim, nLayers, nHeads, nKvHeads, vocabRaw, seqLen] = h as [
    number,
    number,
    number,
    number,
    number,
    number,
    number,
  ];
  const header: Llama2cHeader = {
    dim,
    hiddenDim,
    nLayers,
    nHeads,
    nKvHeads,
    vocabSize: Math.abs(vocabRaw),
    seqLen,
    shared: vocabRaw > 0,
  };
  if (
    [dim, hiddenDim, nLayers, nHeads, nKvHeads, seqLen, header.vocabSize].some((v) => !(v > 0)) ||
    dim % nHeads !== 0 ||
    nHeads % nKvHeads !== 0 ||
    (dim / nHeads) % 2 !== 0
  ) {
    throw new Llama2cError(`${file}: header ${JSON.stringify(h)} is not a valid llama2.c model`);
  }
  const hs = dim / nHeads;
  const kvDim = nKvHeads * hs;
  const V = header.vocabSize;
  const L = nLayers;
  const sizes: Array<[string, number]> = [
    ["tok", V * dim],
    ["rmsAtt", L * dim],
    ["wq", L * dim * dim],
    ["wk", L * kvDim * dim],
    ["wv", L * kvDim * dim],
    ["wo", L * dim * dim],
    ["rmsFfn", L * dim],
    ["w1", L * hiddenDim * dim],
    ["w2", L * dim * hiddenDim],
    ["w3", L * hiddenDim * dim],
    ["rmsFinal", dim],
    ["freqCis", seqLen * hs], // two tables of seq_len × head_size/2, unused
  ];
  if (!header.shared) sizes.push(["wcls", V * dim]);
  const floats = sizes.reduce((a, [, n]) => a + n, 0);
  if (buf.length !== 28 + floats * 4)
    throw new Llama2cError(`${file}: ${buf.length} bytes, but the header implies ${28 + floats * 4}`);
  const all = new Float32Array(buf.buffer.slice(buf.byteOffset + 28, buf.byteOffset + 28 + floats * 4));
  const parts: Record<string, Float32Array> = {};
  let off = 0;
  for (const [name, n] of sizes) {
    parts[name] = all.subarray(off, off + n);
    off += n;
  }
  const layer = (name: string, l: number, per: number) => parts[name]!.slice(l * per, (l + 1) * per);
  const t: Record<string, TensorToWrite> = {};
  const put = (name: string, shape: number[], data: Float32Array) => (t[name] = { dtype: "F32", shape, data });
  put("model.embed_tokens.weight", [V, dim], parts.tok!.slice());
  for (let l = 0; l < L; l++) {
    const p = `model.layers.${l}.`;
    put(p + "input_layernorm.weight", [dim], layer("rmsAtt", l, dim));
    put(p + "self_attn.q_proj.weight", [dim, dim], interleavedToHalves(layer("wq", l, dim * dim), nHeads, hs, dim));
    put(
      p + "self_attn.k_proj.weight",
      [kvDim, dim],
      interleavedToHalves(layer("wk", l, kvDim * dim), nKvHeads, hs, dim),
    );
    put(p + "self_attn.v_proj.weight", [kvDim, dim], layer("wv", l, kvDim * dim));
    put(p + "self_attn.o_proj.weight", [dim, dim], layer("wo", l, dim * dim));
    put(p + "post_attention_layernorm.weight", [dim], layer("rmsFfn", l, dim));
    put(p + "mlp.gate_proj.weight", [hiddenDim, dim], layer("w1", l, hiddenDim * dim));
    put(p + "mlp.down_proj.weight", [dim, hiddenDim], layer("w2", l, dim * hiddenDim));
    put(p + "mlp.up_proj.weight", [hiddenDim, dim], layer("w3", l, hiddenDim * dim));
  }
  put("model.norm.weight", [dim], parts.rmsFinal!.slice());
  if (!header.shared) put("lm_head.weight", [V, dim], parts.wcls!.slice());
  return { header, tensors: t };
}

/**
 * llama2.c rotates adjacent pairs (2i, 2i+1) of each head; HF rotates halves (i, i + hs/2). Reorders the rows
 * of a [heads·hs, cols] projection so that row 2i+j of each head moves to row j·hs/2 + i.
 */
export function interleavedToHalves(w: Float32Array, heads: number, hs: number, cols: number): Float32Array {
  const out = new Float32Array(w.length);
  const half = hs / 2;
  for (let h = 0; h < heads; h++)
    for (let i = 0; i < half; i++)
      for (let j = 0; j < 2; j++) {
        const src = (h * hs + 2 * i + j) * cols;
        const dst = (h * hs + j * half + i) * cols;
        out.set(w.subarray(src, src + cols), dst);
      }
  return out;
}

/** One llama2.c tokenizer entry: piece bytes and merge score. */
export interface Llama2cPiece {
  bytes: Uint8Array;
  score: number;
}

/** Reads a llama2.c tokenizer.bin for a vocabulary of `vocabSize` pieces. */
export function readLlama2cTokenizer(file: string, vocabSize: number): Llama2cPiece[] {
  let buf: Buffer;
  try {
    buf = fs.readFileSync(file);
  } catch (e) {
    throw new Llama2cError(`${file}: cannot read (${(e as NodeJS.ErrnoException).code ?? String(e)})`);
  }
  const pieces: Llama2cPiece[] = [];
  let o = 4;
  for (let i = 0; i < vocabSize; i++) {
    if (o + 8 > buf.length) throw new Llama2cError(`${file}: ends after ${i} of ${vocabSize} tokens`);
    const score = buf.readFloatLE(o);
    const n = buf.readInt32LE(o + 4);
    o += 8;
    if (n < 0 || o + n > buf.length) throw new Llama2cError(`${file}: token ${i} has an invalid length ${n}`);
    pieces.push({ bytes: new Uint8Array(buf.subarray(o, o + n)), score });
    o += n;
  }
  if (o !== buf.length)
    throw new Llama2cError(
      `${file}: ${buf.length - o} bytes left after ${vocabSize} tokens (vocabulary size mismatch?)`,
    );
  return pieces;
}

const SPACE = "\u2581"; // SentencePiece's "▁"

/**
 * Builds an HF tokenizer.json for llama2.c's SentencePiece BPE: ids 0–2 are <unk>, <s>, </s>; ids 3–258 byte
 * fallback <0xXX>; a leading "▁" is added to non-empty text; merges are ranked by the merged piece's score
 * (llama2.c merges the adjacent pair whose result scores highest).
 */
export function llama2cTokenizerJson(pieces: Llama2cPiece[]): Record<string, unknown> {
  const decoder = new TextDecoder("utf-8", { fatal: false });
  const specials = ["<unk>", "<s>", "</s>"];
  const vocab: Record<string, number> = {};
  const text: string[] = pieces.map((p, id) =>
    id < 3 ? specials[id]! : decoder.decode(p.bytes).replaceAll(" ", SPACE),
  );
  text.forEach((s, id) => {
    if (!(s in vocab)) vocab[s] = id;
  });
  const isByte = (id: number) => id >= 3 && id < 259 && /^<0x[0-9A-F]{2}>$/.test(text[id]!);
  const merges: Array<{ pair: [string, string]; score: number; id: number }> = [];
  text.forEach((s, id) => {
    if (id < 3 || isByte(id)) return;
    const chars = Array.from(s);
    for (let cut = 1; cut < chars.length; cut++) {
      const a = chars.slice(0, cut).join("");
      const b = chars.slice(cut).join("");
      const ia = vocab[a];
      const ib = vocab[b];
      if (ia !== undefined && ib !== undefined && ia >= 3 && ib >= 3 && !isByte(ia) && !isByte(ib))
        merges.push({ pair: [a, b], score: pieces[id]!.score, id });
    }
  });
  merges.sort((x, y) => y.score - x.score || x.id - y.id);
  return {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: specials.map((content, id) => ({
      id,
      content,
      single_word: false,
      lstrip: false,
      rstrip: false,
      normalized: false,
      special: true,
    })),
    normalizer: {
      type: "Sequence",
      normalizers: [
        { type: "Prepend", prepend: SPACE },
        { type: "Replace", pattern: { String: " " }, content: SPACE },
      ],
    },
    pre_tokenizer: null,
    post_processor: {
      type: "TemplateProcessing",
      single: [{ SpecialToken: { id: "<s>", type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
      pair: [
        { SpecialToken: { id: "<s>", type_id: 0 } },
        { Sequence: { id: "A", type_id: 0 } },
        { SpecialToken: { id: "<s>", type_id: 1 } },
        { Sequence: { id: "B", type_id: 1 } },
      ],
      special_tokens: { "<s>": { id: "<s>", ids: [1], tokens: ["<s>"] } },
    },
    decoder: {
      type: "Sequence",
      decoders: [
        { type: "Replace", pattern: { String: SPACE }, content: " " },
        { type: "ByteFallback" },
        { type: "Fuse" },
        { type: "Strip", content: " ", start: 1, stop: 0 },
      ],
    },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: "<unk>",
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: true,
      byte_fallback: true,
      ignore_merges: false,
      vocab,
      merges: merges.map((m) => m.pair),
    },
  };
}

/** Converts `model.bin` + `tokenizer.bin` into an HF-layout folder `outDir`. */
export function convertLlama2c(modelFile: string, tokenizerFile: string, outDir: string): LlamaConfig {
  const { header, tensors } = readLlama2cCheckpoint(modelFile);
  const pieces = readLlama2cTokenizer(tokenizerFile, header.vocabSize);
  const cfg: LlamaConfig = {
    hiddenSize: header.dim,
    intermediateSize: header.hiddenDim,
    numLayers: header.nLayers,
    numHeads: header.nHeads,
    numKvHeads: header.nKvHeads,
    headDim: header.dim / header.nHeads,
    vocabSize: header.vocabSize,
    rmsNormEps: 1e-5,
    ropeTheta: 10000,
    ropeScaling: { type: "default" },
    tieWordEmbeddings: header.shared,
    attentionBias: false,
    mlpBias: false,
    maxPositionEmbeddings: header.seqLen,
    bosTokenId: 1,
    eosTokenId: 2,
  };
  fs.mkdirSync(outDir, { recursive: true });
  writeSafetensors(path.join(outDir, "model.safetensors"), tensors, { format: "pt" });
  writeFileAtomic(path.join(outDir, "config.json"), JSON.stringify(configToJson(cfg), null, 2) + "\n");
  writeFileAtomic(path.join(outDir, "tokenizer.json"), JSON.stringify(llama2cTokenizerJson(pieces)) + "\n");
  const tokCfg = {
    tokenizer_class: "LlamaTokenizerFast",
    bos_token: "<s>",
    eos_token: "</s>",
    unk_token: "<unk>",
    add_bos_token: true,
    add_eos_token: false,
    model_max_length: header.seqLen,
    clean_up_tokenization_spaces: false,
    legacy: true,
  };
  writeFileAtomic(path.join(outDir, "tokenizer_config.json"), JSON.stringify(tokCfg, null, 2) + "\n");
  return cfg;
}
