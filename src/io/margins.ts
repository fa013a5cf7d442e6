// margins() as the library exports it: one call from a model and pairs to their margins, for tokenized pairs,
// a batch, or text pairs, which are tokenized exactly as a pairs file's are (tokenizePairs) with the tokenizer
// given or the one the model carries; the scoring is the engine's (engine/margins.ts).
import type { PairBatch } from "../data/batch.js";
import type { Pair } from "../data/pairs.js";
import { margins as scoreMargins, type MarginOptions } from "../engine/margins.js";
import type { LlamaModel } from "../model/llama.js";
import { PairsError, tokenizePairs, type RawPair } from "./pairs.js";
import type { TextTokenizer } from "./tokenizer.js";

/** A pair given in code: text ({prompt, chosen, rejected}) or token ids, as a line of a pairs file holds. */
type GivenPair = Pair | Omit<RawPair, "line">;

const tokenized = (p: GivenPair): p is Pair => Array.isArray(p.promptIds) && "index" in p;

/**
 * Margins log p(chosen | prompt) − log p(rejected | prompt) of each pair under `model`, in order. Text pairs
 * need `tokenizer` (loadTokenizer(folder)) unless the model carries one as `model.tokenizer`.
 */
export function margins(
  model: LlamaModel,
  pairs: Pair[] | PairBatch | GivenPair[],
  opts: MarginOptions & { tokenizer?: TextTokenizer | null } = {},
): Float64Array {
  if (!Array.isArray(pairs) || pairs.every(tokenized)) return scoreMargins(model, pairs as Pair[] | PairBatch, opts);
  const tok = opts.tokenizer ?? model.tokenizer ?? null;
  const raw = pairs.map((p, i): RawPair => ({ ...p, line: i + 1 }));
  if (!tok && raw.some((r) => !r.promptIds))
    throw new PairsError("margins of text pairs need a tokenizer: pass { tokenizer: loadTokenizer(modelFolder) }");
  let tokenizedPairs: Pair[];
  try {
    tokenizedPairs = tokenizePairs(raw, tok, model.config.vocabSize).pairs;
  } catch (e) {
    // tokenizePairs names a file's line; here the pair is an array entry
    if (e instanceof PairsError) throw new PairsError(e.message.replace(/^line (\d+):/, (_, n) => `pairs[${n - 1}]:`));
    throw e;
  }
  return scoreMargins(model, tokenizedPairs, opts);
}
