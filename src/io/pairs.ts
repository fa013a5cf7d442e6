// Preference pairs from JSONL (optionally .gz): {prompt, chosen, rejected} (TRL), HH-RLHF {chosen, rejected}
// whole dialogues split at the last "\n\nAssistant:", or pre-tokenized {prompt_ids, chosen_ids, rejected_ids}; with
// a chat template (format chat), text pairs and TRL's message lists are read as conversations and rendered (chat.ts).
import * as fs from "node:fs";
import * as zlib from "node:zlib";
import type { Pair } from "../data/pairs.js";
import type { PairFormat } from "../analysis/settings.js";
import {
  ChatTemplateError,
  conversationOf,
  renderChatPair,
  requireChatTemplate,
  type ChatPair,
  type ChatTemplate,
} from "./chat.js";
import { loadConfig } from "./config.js";
import { loadTokenizer, type TextTokenizer } from "./tokenizer.js";

/** A pair as read from one line, before tokenization. */
export interface RawPair {
  line: number; // 1-based line number in the file
  prompt?: string;
  chosen?: string;
  rejected?: string;
  promptIds?: number[];
  chosenIds?: number[];
  rejectedIds?: number[];
  /** The line was not valid UTF-8: each bad byte sequence reads as U+FFFD. */
  invalidUtf8?: boolean;
  /**
   * Read as a conversation and rendered through a chat template: the texts above are the renderings, which hold
   * their special tokens (BOS included) as text, so they are tokenized without adding any.
   */
  messages?: ChatPair;
}

/** A problem with the pairs file, naming its line. */
export class PairsError extends Error {
  override name = "PairsError";
}

const HH_TURN = "\n\nAssistant:";

/** Splits an HH-RLHF pair of whole dialogues into the shared prompt (up to the last Assistant turn) and responses. */
export function splitHH(chosen: string, rejected: string): { prompt: string; chosen: string; rejected: string } | null {
  const at = chosen.lastIndexOf(HH_TURN);
  if (at < 0) return null;
  const prompt = chosen.slice(0, at + HH_TURN.length);
  if (!rejected.startsWith(prompt) || rejected.indexOf(HH_TURN, prompt.length) >= 0) return null;
  return { prompt, chosen: chosen.slice(prompt.length), rejected: rejected.slice(prompt.length) };
}

function parseLine(text: string, line: number, chat?: ChatTemplate): RawPair {
  let o: unknown;
  try {
    o = JSON.parse(text);
  } catch {
    throw new PairsError(`line ${line}: not valid JSON`);
  }
  if (o === null || typeof o !== "object" || Array.isArray(o)) throw new PairsError(`line ${line}: not a JSON object`);
  const r = o as Record<string, unknown>;
  const isIds = (v: unknown) => Array.isArray(v) && v.every((x) => Number.isInteger(x) && x >= 0);
  if ("prompt_ids" in r || "chosen_ids" in r || "rejected_ids" in r) {
    for (const k of ["prompt_ids", "chosen_ids", "rejected_ids"])
      if (!isIds(r[k])) throw new PairsError(`line ${line}: ${k} must be an array of non-negative integers`);
    return {
      line,
      promptIds: r.prompt_ids as number[],
      chosenIds: r.chosen_ids as number[],
      rejectedIds: r.rejected_ids as number[],
    };
  }
  if (chat) return chatLine(r, line, chat);
  if (Array.isArray(r.chosen) || Array.isArray(r.rejected))
    throw new PairsError(
      `line ${line}: "chosen" and "rejected" are lists of messages: conversations need --format chat`,
    );
  if (typeof r.chosen !== "string" || typeof r.rejected !== "string")
    throw new PairsError(
      `line ${line}: needs string fields "chosen" and "rejected" (or prompt_ids/chosen_ids/rejected_ids)`,
    );
  if ("prompt" in r) {
    if (typeof r.prompt !== "string") throw new PairsError(`line ${line}: "prompt" must be a string`);
    return { line, prompt: r.prompt, chosen: r.chosen, rejected: r.rejected };
  }
  const hh = splitHH(r.chosen, r.rejected);
  if (!hh)
    throw new PairsError(
      `line ${line}: chosen and rejected share no prefix ending in "\\n\\nAssistant:" (HH-RLHF format) and there is no "prompt"`,
    );
  return { line, ...hh };
}

/** A text pair read as a conversation and rendered through the chat template (errors name the line). */
function chatLine(r: Record<string, unknown>, line: number, chat: ChatTemplate): RawPair {
  try {
    const messages = conversationOf(r);
    return { line, ...renderChatPair(chat, messages), messages };
  } catch (e) {
    if (e instanceof ChatTemplateError) throw new PairsError(`line ${line}: ${e.message}`);
    throw e;
  }
}

/**
 * The lines of a pairs file (gunzipped when it ends in .gz; a UTF-8 byte-order mark is dropped), and which
 * (0-based) are not valid UTF-8: such a line is read with U+FFFD for each bad sequence, and said so.
 */
function readPairsLines(file: string): { lines: string[]; invalid: Set<number> } {
  const buf = readPairsBytes(file);
  const strict = new TextDecoder("utf-8", { fatal: true, ignoreBOM: false });
  const invalid = new Set<number>();
  try {
    strict.decode(buf);
  } catch {
    // 0x0A never occurs inside a multi-byte sequence, so the lines can be checked one by one
    let start = 0;
    for (let i = 0, line = 0; i <= buf.length; i++) {
      if (i < buf.length && buf[i] !== 0x0a) continue;
      try {
        strict.decode(buf.subarray(start, i));
      } catch {
        invalid.add(line);
      }
      start = i + 1;
      line++;
    }
  }
  return { lines: new TextDecoder("utf-8").decode(buf).split("\n"), invalid };
}

/** The bytes of a pairs file (gunzipped when it ends in .gz). */
function readPairsBytes(file: string): Buffer {
  let buf: Buffer;
  try {
    buf = fs.readFileSync(file);
  } catch (e) {
    throw new PairsError(`${file}: cannot read (${(e as NodeJS.ErrnoException).code ?? String(e)})`);
  }
  if (file.endsWith(".gz")) {
    try {
      buf = zlib.gunzipSync(buf);
    } catch {
      throw new PairsError(`${file}: not a valid gzip file`);
    }
  }
  return buf;
}

/**
 * The pairs of a file, one per non-blank line, parsed only when asked for (so `--limit` never reads past
 * the lines it needs): a RawPair, or the line's error prefixed with the file name. With `chat`, text pairs are
 * conversations rendered through it.
 */
export function* iterPairs(
  file: string,
  opts: { chat?: ChatTemplate } = {},
): Generator<RawPair | { line: number; error: string }> {
  const { lines, invalid } = readPairsLines(file);
  let any = false;
  for (let i = 0; i < lines.length; i++) {
    if (lines[i]!.trim() === "") continue;
    any = true;
    try {
      const p = parseLine(lines[i]!, i + 1, opts.chat);
      yield invalid.has(i) ? { ...p, invalidUtf8: true } : p;
    } catch (e) {
      yield { line: i + 1, error: `${file}: ${(e as Error).message}` };
    }
  }
  if (!any) throw new PairsError(`${file}: no pairs`);
}

/**
 * Reads the whole pairs file; with skipBad, malformed lines are counted and skipped instead of failing. With
 * `chat`, text pairs are conversations rendered through it.
 */
export function readPairs(
  file: string,
  opts: { skipBad?: boolean; chat?: ChatTemplate } = {},
): { pairs: RawPair[]; bad: Array<{ line: number; reason: string }> } {
  const pairs: RawPair[] = [];
  const bad: Array<{ line: number; reason: string }> = [];
  for (const r of iterPairs(file, { chat: opts.chat })) {
    if (!("error" in r)) pairs.push(r);
    else if (!opts.skipBad) throw new PairsError(r.error);
    else bad.push({ line: r.line, reason: r.error });
  }
  if (pairs.length === 0)
    throw new PairsError(`${file}: no pairs${bad.length ? ` (${bad.length} malformed lines skipped)` : ""}`);
  return { pairs, bad };
}

/** Length of the longest common prefix of two id lists. */
function commonPrefix(a: number[], b: number[]): number {
  let k = 0;
  while (k < a.length && k < b.length && a[k] === b[k]) k++;
  return k;
}

/**
 * Token ids of a text pair as the model reads it: prompt + response tokenized as one text (special tokens as
 * the tokenizer's settings say), split where both joint texts stop agreeing with the prompt's own ids. So a
 * response is tokenized exactly as it appears after its prompt (no SentencePiece dummy prefix at the seam),
 * prompt ids + response ids = the joint tokenization, and both responses share the prompt ids. `merged`
 * counts prompt tokens that a merge across the seam moved into the responses. `addSpecialTokens: false` for texts
 * that already hold them (chat renderings: a second BOS would be scored as part of the prompt).
 */
export function tokenizeTextPair(
  tok: TextTokenizer,
  prompt: string,
  chosen: string,
  rejected: string,
  opts: { addSpecialTokens?: boolean } = {},
): { promptIds: number[]; chosenIds: number[]; rejectedIds: number[]; merged: number } {
  const own = tok.encode(prompt, opts);
  const jc = tok.encode(prompt + chosen, opts);
  const jr = tok.encode(prompt + rejected, opts);
  const k = Math.min(commonPrefix(own, jc), commonPrefix(own, jr));
  return { promptIds: jc.slice(0, k), chosenIds: jc.slice(k), rejectedIds: jr.slice(k), merged: own.length - k };
}

/** What a pairs file gave: the pairs to run, and what was skipped and why. */
export interface TokenizedPairs {
  pairs: Pair[];
  tooLong: number; // skipped: longer than maxTokens
  bad: Array<{ line: number; reason: string }>; // skipped with skipBad: malformed or unusable
  merged: number; // pairs whose prompt's last token(s) merged with the responses (see tokenizeTextPair)
  identical: number; // pairs whose chosen and rejected token ids are the same (margin 0 by construction)
  invalidUtf8: number; // pairs read from lines that were not valid UTF-8 (bad sequences as U+FFFD)
}

/**
 * Tokenizes pairs (text pairs by tokenizeTextPair; pre-tokenized pairs as they are) until `limit` usable ones.
 * Pairs longer than maxTokens are skipped and counted; invalid ones fail (or are counted with skipBad).
 */
export function tokenizePairs(
  raw: Iterable<RawPair | { line: number; error: string }>,
  tok: TextTokenizer | null,
  vocabSize: number,
  opts: { maxTokens?: number; limit?: number; skipBad?: boolean } = {},
): TokenizedPairs {
  const out: TokenizedPairs = { pairs: [], tooLong: 0, bad: [], merged: 0, identical: 0, invalidUtf8: 0 };
  for (const r of raw) {
    if (opts.limit !== undefined && out.pairs.length >= opts.limit) break;
    try {
      if ("error" in r) throw new PairsError(r.error);
      let p: Omit<Pair, "index">;
      let merged = 0;
      if (r.promptIds)
        p = { line: r.line, promptIds: r.promptIds, chosenIds: r.chosenIds!, rejectedIds: r.rejectedIds! };
      else {
        if (!tok)
          throw new PairsError(
            `line ${r.line}: text pairs need a tokenizer.json in the base model folder (or use prompt_ids/chosen_ids/rejected_ids)`,
          );
        const t = tokenizeTextPair(tok, r.prompt!, r.chosen!, r.rejected!, { addSpecialTokens: !r.messages });
        merged = t.merged;
        p = {
          line: r.line,
          promptIds: t.promptIds,
          chosenIds: t.chosenIds,
          rejectedIds: t.rejectedIds,
          prompt: r.prompt,
          chosen: r.chosen,
          rejected: r.rejected,
        };
      }
      if (p.promptIds.length === 0)
        throw new PairsError(
          `line ${r.line}: the prompt has no tokens (nothing to predict the first response token from)`,
        );
      if (p.chosenIds.length === 0 || p.rejectedIds.length === 0)
        throw new PairsError(`line ${r.line}: a response has no tokens`);
      const big = [...p.promptIds, ...p.chosenIds, ...p.rejectedIds].find((id) => id >= vocabSize);
      if (big !== undefined)
        throw new PairsError(`line ${r.line}: token id ${big} is outside the vocabulary (size ${vocabSize})`);
      if (
        opts.maxTokens !== undefined &&
        p.promptIds.length + Math.max(p.chosenIds.length, p.rejectedIds.length) > opts.maxTokens
      ) {
        out.tooLong++;
        continue;
      }
      if (merged > 0) out.merged++;
      if (r.invalidUtf8) out.invalidUtf8++;
      if (p.chosenIds.length === p.rejectedIds.length && p.chosenIds.every((id, i) => id === p.rejectedIds[i]))
        out.identical++;
      out.pairs.push({ index: out.pairs.length, ...p });
    } catch (e) {
      if (!opts.skipBad || !(e instanceof PairsError)) throw e;
      out.bad.push({ line: r.line, reason: e.message });
    }
  }
  return out;
}

/**
 * The usable pairs of a file, read lazily (tokenizePairs over iterPairs, so `limit` stops the reading), with
 * what was skipped; no usable pair at all is an error that says why.
 */
export function readUsablePairs(
  file: string,
  tok: TextTokenizer | null,
  vocabSize: number,
  opts: { maxTokens?: number; limit?: number; skipBad?: boolean; chat?: ChatTemplate } = {},
): TokenizedPairs {
  const tp = tokenizePairs(iterPairs(file, { chat: opts.chat }), tok, vocabSize, opts);
  const why = [
    ...(opts.maxTokens === undefined ? [] : [`${tp.tooLong} longer than ${opts.maxTokens} tokens`]),
    `${tp.bad.length} malformed`,
  ];
  if (tp.pairs.length === 0) throw new PairsError(`no usable pairs in ${file} (${why.join(", ")})`);
  return tp;
}

/**
 * Reads a pairs file and tokenizes it with a model folder's tokenizer: the pairs ready for runAnalysis.
 * Malformed lines fail (or, with skipBad, are skipped); pairs longer than maxTokens are skipped. Format "chat"
 * renders conversations through the folder's chat template (an error when it has none).
 */
export function loadPairs(
  file: string,
  modelDir: string,
  opts: { limit?: number; maxTokens?: number; skipBad?: boolean; format?: PairFormat } = {},
): Pair[] {
  const chat = opts.format === "chat" ? requireChatTemplate(modelDir) : undefined;
  return readUsablePairs(file, loadTokenizer(modelDir), loadConfig(modelDir).vocabSize, { ...opts, chat }).pairs;
}
