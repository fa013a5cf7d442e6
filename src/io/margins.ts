// margins() as the library exports it: one call from a model and pairs to their margins, for tokenized pairs,
// a batch, or text pairs, which are checked and tokenized exactly as a pairs file's are (pairFields, then
// tokenizePairs) with the tokenizer given or the one the model carries; the scoring is the engine's
// (engine/margins.ts).
import type { PairBatch } from "../data/batch.js";
import type { Pair } from "../data/pairs.js";
import { margins as scoreMargins, type MarginOptions } from "../engine/margins.js";
import type { LlamaModel } from "../model/llama.js";
import { pairFields, PairsError, tokenizePairs, type RawPair } from "./pairs.js";
import type { TextTokenizer } from "./tokenizer.js";

/** A pair given in code: text ({prompt, chosen, rejected}) or token ids, as a line of a pairs file holds. */
type GivenPair = Pair | Omit<RawPair, "line">;

const tokenized = (p: GivenPair): p is Pair => Array.isArray(p.promptIds) && "index" in p;
const entry = (i: number) => `pairs[${i}]`;

/**
 * Margins log p(chosen | prompt) − log p(rejected | prompt) of each pair under `model`, in order. Text pairs
 * need `tokenizer` (loadTokenizer(folder)) unless the model carries one as `model.tokenizer`. Each pair is
 * checked as a pairs file's line is (string fields, or arrays of token ids; an HH-RLHF pair without a prompt is
 * split at its last Assistant turn); a pair longer than the model's context is an error, not skipped.
 */
export function margins(
  model: LlamaModel,
  pairs: Pair[] | PairBatch | GivenPair[],
  opts: MarginOptions & { tokenizer?: TextTokenizer | null } = {},
): Float64Array {
  if (!Array.isArray(pairs)) {
    if (!Array.isArray((pairs as PairBatch | null)?.pairs))
      throw new PairsError("margins takes an array of pairs or a batch (makeBatch)");
    checkContext(model, pairs.pairs);
    return scoreMargins(model, pairs, opts);
  }
  const raw = pairs.map((p, i): RawPair => {
    if (p === null || typeof p !== "object" || Array.isArray(p)) throw new PairsError(`${entry(i)}: not an object`);
    return { ...pairFields(p as unknown as Record<string, unknown>, entry(i)), line: i + 1 };
  });
  const given = pairs as GivenPair[];
  if (given.every(tokenized)) {
    checkContext(model, given);
    return scoreMargins(model, given, opts);
  }
  const tok = opts.tokenizer ?? model.tokenizer ?? null;
  if (!tok && raw.some((r) => !r.promptIds))
    throw new PairsError("margins of text pairs need a tokenizer: pass { tokenizer: loadTokenizer(modelFolder) }");
  // the line tokenizePairs names is the entry's index + 1
  const tp = tokenizePairs(raw, tok, model.config.vocabSize, { at: (line) => entry(line - 1) });
  checkContext(model, tp.pairs);
  return scoreMargins(model, tp.pairs, opts);
}

/** Refuses the first pair longer than the model's context (a pairs file's reader skips it; a call should say). */
function checkContext(model: LlamaModel, pairs: Pair[]): void {
  const context = model.config.maxPositionEmbeddings;
  pairs.forEach((p, i) => {
    const n = p.promptIds.length + Math.max(p.chosenIds.length, p.rejectedIds.length);
    if (n > context)
      throw new PairsError(
        `${entry(i)}: ${n} tokens (prompt and the longer response), longer than the model's context (max_position_embeddings ${context})`,
      );
  });
}
