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
  const ids = ["prompt_ids", "chosen_ids", "rejected_ids"] as const;
  if (chat && !ids.some((k) => k in r)) return chatLine(r, line, chat);
  return { line, ...pairFields(r, `line ${line}`, ids) };
}

/** The names of a pair's id fields: a file's, or a pair given in code (RawPair's). */
type IdKeys = readonly [prompt: string, chosen: string, rejected: string];

/**
 * A pair's fields as a pairs file's line gives them, checked: pre-tokenized when any of the `ids` fields is there
 * (then all three must be arrays of non-negative integers), else strings "chosen" and "rejected" with a string
 * "prompt", or without one an HH-RLHF pair of whole dialogues split at its last Assistant turn (splitHH). An
 * absent field is one that is undefined. A PairsError names `where` ("line 3", "pairs[2]") and the field.
 */
export function pairFields(
  r: Record<string, unknown>,
  where: string,
  ids: IdKeys = ["promptIds", "chosenIds", "rejectedIds"],
): Omit<RawPair, "line"> {
  const isIds = (v: unknown) => Array.isArray(v) && v.every((x) => Number.isInteger(x) && x >= 0);
  if (ids.some((k) => r[k] !== undefined)) {
    for (const k of ids)
      if (!isIds(r[k])) throw new PairsError(`${where}: ${k} must be an array of non-negative integers`);
    return { promptIds: r[ids[0]] as number[], chosenIds: r[ids[1]] as number[], rejectedIds: r[ids[2]] as number[] };
  }
  if (Array.isArray(r.chosen) || Array.isArray(r.rejected))
    throw new PairsError(`${where}: "chosen" and "rejected" are lists of messages: conversations need --format chat`);
  for (const k of ["chosen", "rejected"])
    if (typeof r[k] !== "string")
      throw new PairsError(
        `${where}: ${notString(k, r[k])} (a pair needs strings "chosen" and "rejected", or ${ids.join("/")})`,
      );
  const [chosen, rejected] = [r.chosen as string, r.rejected as string];
  if (r.prompt !== undefined) {
    if (typeof r.prompt !== "string") throw new PairsError(`${where}: ${notString("prompt", r.prompt)}`);
    return { prompt: r.prompt, chosen, rejected };
  }
  const hh = splitHH(chosen, rejected);
  if (!hh)
    throw new PairsError(
      `${where}: chosen and rejected share no prefix ending in "\\n\\nAssistant:" (HH-RLHF format) and there is no "prompt"`,
    );
  return hh;
}

/** What is wrong with field `k`, which should have been a string. */
const notString = (k: string, v: unknown) =>
  v === undefined
    ? `"${k}" is missing`
    : `"${k}" must be a string, got ${v === null ? "null" : Array.isArray(v) ? "an array" : `a ${typeof v}`}`;

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
 * Pairs longer than maxTokens are skipped and counted; invalid ones fail (or are counted with skipBad), their
 * errors naming the pair by `at(line)` ("line 3" unless given; a file's reader gives "file: line 3").
 */
export function tokenizePairs(
  raw: Iterable<RawPair | { line: number; error: string }>,
  tok: TextTokenizer | null,
  vocabSize: number,
  opts: { maxTokens?: number; limit?: number; skipBad?: boolean; at?: (line: number) => string } = {},
): TokenizedPairs {
  const at = opts.at ?? ((line: number) => `line ${line}`);
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
            `${at(r.line)}: text pairs need a tokenizer.json in the base model folder (or use prompt_ids/chosen_ids/rejected_ids)`,
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
          `${at(r.line)}: the prompt has no tokens (nothing to predict the first response token from)`,
        );
      if (p.chosenIds.length === 0 || p.rejectedIds.length === 0)
        throw new PairsError(`${at(r.line)}: a response has no tokens`);
      const big = [...p.promptIds, ...p.chosenIds, ...p.rejectedIds].find((id) => id >= vocabSize);
      if (big !== undefined)
        throw new PairsError(`${at(r.line)}: token id ${big} is outside the vocabulary (size ${vocabSize})`);
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
  const at = (line: number) => `${file}: line ${line}`; // as iterPairs names a line it cannot read
  const tp = tokenizePairs(iterPairs(file, { chat: opts.chat }), tok, vocabSize, { ...opts, at });
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
