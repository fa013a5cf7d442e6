// Tokenizer of a model folder: tokenizer.json (+ tokenizer_config.json) through @huggingface/tokenizers.
import * as fs from "node:fs";
import * as path from "node:path";
import { Tokenizer } from "@huggingface/tokenizers";

import type { TextTokenizer } from "../model/text.js";

export type { TextTokenizer };

/** A tokenizer folder that cannot be read. */
export class TokenizerError extends Error {
  override name = "TokenizerError";
}

/** Tokenizer model types of tokenizer.json that @huggingface/tokenizers implements. */
const KNOWN_MODELS = ["BPE", "WordPiece", "Unigram"];

const readJson = (file: string): Record<string, unknown> => {
  try {
    return JSON.parse(fs.readFileSync(file, "utf8"));
  } catch {
    throw new TokenizerError(`${file}: not valid JSON`);
  }
};

/** Loads `<dir>/tokenizer.json`; returns null when the folder has none. */
export function loadTokenizer(dir: string): TextTokenizer | null {
  const file = path.join(dir, "tokenizer.json");
  if (!fs.existsSync(file)) return null;
  const json = readJson(file);
  const kind = (json.model as { type?: unknown } | undefined)?.type;
  if (!KNOWN_MODELS.includes(String(kind)))
    throw new TokenizerError(
      `${file}: tokenizer model type ${JSON.stringify(kind ?? null)} is not one of ${KNOWN_MODELS.join(", ")}`,
    );
  const cfgFile = path.join(dir, "tokenizer_config.json");
  const config = fs.existsSync(cfgFile) ? readJson(cfgFile) : {};
  let tok: Tokenizer;
  try {
    tok = new Tokenizer(json, config);
  } catch (e) {
    throw new TokenizerError(`${file}: cannot be loaded (${(e as Error).message})`);
  }
  const bosName =
    typeof config.bos_token === "string"
      ? config.bos_token
      : ((config.bos_token as { content?: string } | undefined)?.content ?? null);
  const bosId = bosName !== null ? (tok.token_to_id(bosName) ?? null) : null;
  const probe = tok.encode("a").ids;
  return {
    encode: (text, opts) => tok.encode(text, { add_special_tokens: opts?.addSpecialTokens ?? true }).ids,
    decode: (ids, opts) => tok.decode(ids, { skip_special_tokens: opts?.skipSpecialTokens ?? false }),
    idToToken: (id) => tok.id_to_token(id),
    bosId,
    addsBos: bosId !== null && probe[0] === bosId,
  };
}
