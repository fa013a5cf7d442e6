// The model's shape: a Hugging Face LlamaForCausalLM config.json object ⇄ a typed, validated LlamaConfig.

/** RoPE frequency scaling, as Hugging Face's `rope_scaling` (types default, linear and llama3). */
export type RopeScaling =
  | { type: "default" }
  | { type: "linear"; factor: number }
  | { type: "llama3"; factor: number; lowFreqFactor: number; highFreqFactor: number; originalMaxPositions: number };

/** Everything the forward pass needs to know about a Llama model's shape. */
export interface LlamaConfig {
  hiddenSize: number;
  intermediateSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  vocabSize: number;
  rmsNormEps: number;
  ropeTheta: number;
  ropeScaling: RopeScaling;
  tieWordEmbeddings: boolean;
  attentionBias: boolean;
  mlpBias: boolean;
  maxPositionEmbeddings: number;
  bosTokenId: number | null;
  eosTokenId: number | number[] | null;
}

/** A config that is missing, malformed or asks for something not implemented. */
export class ConfigError extends Error {
  override name = "ConfigError";
}

/** Validates a parsed config.json object; `where` names it in errors. */
export function parseConfig(raw: unknown, where = "config.json"): LlamaConfig {
  if (raw === null || typeof raw !== "object" || Array.isArray(raw))
    throw new ConfigError(`${where}: not a JSON object`);
  const c = raw as Record<string, unknown>;
  const fail = (msg: string): never => {
    throw new ConfigError(`${where}: ${msg}`);
  };
  if (c.model_type !== undefined && c.model_type !== "llama")
    fail(`model_type "${String(c.model_type)}" is not supported (only "llama")`);
  const act = c.hidden_act ?? "silu";
  if (act !== "silu") fail(`hidden_act "${String(act)}" is not supported (only "silu")`);
  const posInt = (key: string, dflt?: number): number => {
    const v = c[key] ?? dflt;
    if (v === undefined) return fail(`missing ${key}`);
    if (typeof v !== "number" || !Number.isInteger(v) || v <= 0)
      return fail(`${key} must be a positive integer, got ${JSON.stringify(v)}`);
    return v;
  };
  const posNum = (key: string, dflt?: number): number => {
    const v = c[key] ?? dflt;
    if (v === undefined) return fail(`missing ${key}`);
    if (typeof v !== "number" || !(v > 0) || !Number.isFinite(v))
      return fail(`${key} must be a positive number, got ${JSON.stringify(v)}`);
    return v;
  };
  const bool = (key: string, dflt: boolean): boolean => {
    const v = c[key] ?? dflt;
    if (typeof v !== "boolean") return fail(`${key} must be true or false`);
    return v;
  };
  const hiddenSize = posInt("hidden_size");
  const numHeads = posInt("num_attention_heads");
  const numKvHeads = posInt("num_key_value_heads", numHeads);
  if (numHeads % numKvHeads !== 0)
    fail(`num_attention_heads ${numHeads} is not a multiple of num_key_value_heads ${numKvHeads}`);
  if (c.head_dim === undefined && hiddenSize % numHeads !== 0)
    fail(`hidden_size ${hiddenSize} is not divisible by num_attention_heads ${numHeads}`);
  const headDim = posInt("head_dim", hiddenSize / numHeads);
  if (headDim % 2 !== 0) fail(`head_dim ${headDim} must be even for RoPE`);
  if (c.pretraining_tp !== undefined && c.pretraining_tp !== 1)
    fail(`pretraining_tp ${String(c.pretraining_tp)} is not supported (only 1)`);
  const maxPos = posInt("max_position_embeddings", 2048);
  const tokenId = (key: string): number | null => {
    const v = c[key];
    if (v === undefined || v === null) return null;
    if (typeof v !== "number" || !Number.isInteger(v) || v < 0) return fail(`${key} must be a token id`);
    return v;
  };
  let eos: number | number[] | null;
  if (Array.isArray(c.eos_token_id)) {
    if (!c.eos_token_id.every((v) => Number.isInteger(v) && v >= 0)) fail("eos_token_id must be token ids");
    eos = c.eos_token_id as number[];
  } else eos = tokenId("eos_token_id");
  return {
    hiddenSize,
    intermediateSize: posInt("intermediate_size"),
    numLayers: posInt("num_hidden_layers"),
    numHeads,
    numKvHeads,
    headDim,
    vocabSize: posInt("vocab_size"),
    rmsNormEps: posNum("rms_norm_eps", 1e-6),
    ropeTheta: posNum("rope_theta", 10000),
    ropeScaling: parseRopeScaling(c.rope_scaling, fail),
    tieWordEmbeddings: bool("tie_word_embeddings", false),
    attentionBias: bool("attention_bias", false),
    mlpBias: bool("mlp_bias", false),
    maxPositionEmbeddings: maxPos,
    bosTokenId: tokenId("bos_token_id"),
    eosTokenId: eos,
  };
}

function parseRopeScaling(rs: unknown, fail: (m: string) => never): RopeScaling {
  if (rs === undefined || rs === null) return { type: "default" };
  if (typeof rs !== "object" || Array.isArray(rs)) return fail("rope_scaling must be an object or null");
  const r = rs as Record<string, unknown>;
  const kind = r.rope_type ?? r.type;
  const num = (key: string): number => {
    const v = r[key];
    if (typeof v !== "number" || !(v > 0) || !Number.isFinite(v))
      return fail(`rope_scaling.${key} must be a positive number`);
    return v;
  };
  switch (kind) {
    case "default":
      return { type: "default" };
    case "linear":
      return { type: "linear", factor: num("factor") };
    case "llama3": {
      const s: RopeScaling = {
        type: "llama3",
        factor: num("factor"),
        lowFreqFactor: num("low_freq_factor"),
        highFreqFactor: num("high_freq_factor"),
        originalMaxPositions: num("original_max_position_embeddings"),
      };
      if (s.highFreqFactor <= s.lowFreqFactor) fail("rope_scaling.high_freq_factor must exceed low_freq_factor");
      return s;
    }
    default:
      return fail(`rope_scaling type ${JSON.stringify(kind)} is not supported (default, linear, llama3)`);
  }
}

/** Writes a LlamaConfig back out as a Hugging Face config.json object. */
export function configToJson(cfg: LlamaConfig, dtype = "float32"): Record<string, unknown> {
  const rs = cfg.ropeScaling;
  return {
    architectures: ["LlamaForCausalLM"],
    model_type: "llama",
    hidden_size: cfg.hiddenSize,
    intermediate_size: cfg.intermediateSize,
    num_hidden_layers: cfg.numLayers,
    num_attention_heads: cfg.numHeads,
    num_key_value_heads: cfg.numKvHeads,
    head_dim: cfg.headDim,
    vocab_size: cfg.vocabSize,
    rms_norm_eps: cfg.rmsNormEps,
    rope_theta: cfg.ropeTheta,
    rope_scaling:
      rs.type === "default"
        ? null
        : rs.type === "linear"
          ? { rope_type: "linear", factor: rs.factor }
          : {
              rope_type: "llama3",
              factor: rs.factor,
              low_freq_factor: rs.lowFreqFactor,
              high_freq_factor: rs.highFreqFactor,
              original_max_position_embeddings: rs.originalMaxPositions,
            },
    tie_word_embeddings: cfg.tieWordEmbeddings,
    attention_bias: cfg.attentionBias,
    mlp_bias: cfg.mlpBias,
    max_position_embeddings: cfg.maxPositionEmbeddings,
    hidden_act: "silu",
    bos_token_id: cfg.bosTokenId,
    eos_token_id: cfg.eosTokenId,
    torch_dtype: dtype,
  };
}
