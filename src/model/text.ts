// What a model needs of a tokenizer: text to ids and back. The model layer only names the shape; a model folder's
// tokenizer (io/tokenizer.ts) implements it.

/** Text ⇄ ids for one model. `encode` adds special tokens (BOS) exactly as the tokenizer's own settings say. */
export interface TextTokenizer {
  encode(text: string, opts?: { addSpecialTokens?: boolean }): number[];
  decode(ids: number[], opts?: { skipSpecialTokens?: boolean }): string;
  /** The token's own string, for display (e.g. "▁the", "<0x0A>"). */
  idToToken(id: number): string | undefined;
  /** Id of the beginning-of-sequence token, when the tokenizer has one. */
  bosId: number | null;
  /** Whether `encode` with special tokens puts BOS first. */
  addsBos: boolean;
}
