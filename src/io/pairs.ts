// Preference pairs from JSONL (optionally .gz): {prompt, chosen, rejected} (TRL), HH-RLHF {chosen, rejected}
// whole dialogues split at the last "\n\nAssistant:", or pre-tokenized {prompt_ids, chosen_ids, rejected_ids}.
import * as fs from "node:fs";
import * as zlib from "node:zlib";
import type { Pair } from "../data/pairs.js";
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

function parseLine(text: string, line: number): RawPair {
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
    for (const k of ["prompt_ids", "chosen_ids", "rejected_ids"]) if (!isIds(r[k])) throw new PairsError(`line ${line}: ${k} must be an array of non-negative integers`);
    return { line, promptIds: r.prompt_ids as number[], chosenIds: r.chosen_ids as number[], rejectedIds: r.rejected_ids as number[] };
  }
  if (typeof r.chosen !== "string" || typeof r.rejected !== "string") throw new PairsError(`line ${line}: needs string fields "chosen" and "rejected" (or prompt_ids/chosen_ids/rejected_ids)`);
  if ("prompt" in r) {
    if (typeof r.prompt !== "string") throw new PairsError(`line ${line}: "prompt" must be a string`);
    return { line, prompt: r.prompt, chosen: r.chosen, rejected: r.rejected };
  }
  const hh = splitHH(r.chosen, r.rejected);
  if (!hh) throw new PairsError(`line ${line}: chosen and rejected share no prefix ending in "\\n\\nAssistant:" (HH-RLHF format) and there is no "prompt"`);
  return { line, ...hh };
}

/** Reads the pairs file; with skipBad, malformed lines are counted and skipped instead of failing. */
export function readPairs(file: string, opts: { skipBad?: boolean } = {}): { pairs: RawPair[]; bad: Array<{ line: number; reason: string }> } {
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
  const pairs: RawPair[] = [];
  const bad: Array<{ line: number; reason: string }> = [];
  buf
    .toString("utf8")
    .split("\n")
    .forEach((text, i) => {
      if (text.trim() === "") return;
      try {
        pairs.push(parseLine(text, i + 1));
      } catch (e) {
        if (!opts.skipBad) throw new PairsError(`${file}: ${(e as Error).message}`);
        bad.push({ line: i + 1, reason: (e as Error).message });
      }
    });
  if (pairs.length === 0) throw new PairsError(`${file}: no pairs${bad.length ? ` (${bad.length} malformed lines skipped)` : ""}`);
  return { pairs, bad };
}

/**
 * Tokenizes pairs: the prompt with the tokenizer's own special tokens (BOS), each response without, ids
 * concatenated (no merge across the boundary). Pre-tokenized pairs are used as they are.
 * Pairs longer than maxTokens are skipped and counted; invalid ones fail (or are counted with skipBad).
 */
export function tokenizePairs(
  raw: RawPair[],
  tok: TextTokenizer | null,
  vocabSize: number,
  opts: { maxTokens?: number; limit?: number; skipBad?: boolean } = {},
): { pairs: Pair[]; tooLong: number; bad: Array<{ line: number; reason: string }> } {
  const pairs: Pair[] = [];
  const bad: Array<{ line: number; reason: string }> = [];
  let tooLong = 0;
  for (const r of raw) {
    if (opts.limit !== undefined && pairs.length >= opts.limit) break;
    try {
      let p: Omit<Pair, "index">;
      if (r.promptIds) p = { line: r.line, promptIds: r.promptIds, chosenIds: r.chosenIds!, rejectedIds: r.rejectedIds! };
      else {
        if (!tok) throw new PairsError(`line ${r.line}: text pairs need a tokenizer.json in the base model folder (or use prompt_ids/chosen_ids/rejected_ids)`);
        p = {
          line: r.line,
          promptIds: tok.encode(r.prompt!),
          chosenIds: tok.encode(r.chosen!, { addSpecialTokens: false }),
          rejectedIds: tok.encode(r.rejected!, { addSpecialTokens: false }),
          prompt: r.prompt,
          chosen: r.chosen,
          rejected: r.rejected,
        };
      }
      if (p.promptIds.length === 0) throw new PairsError(`line ${r.line}: the prompt has no tokens (nothing to predict the first response token from)`);
      if (p.chosenIds.length === 0 || p.rejectedIds.length === 0) throw new PairsError(`line ${r.line}: a response has no tokens`);
      const big = [...p.promptIds, ...p.chosenIds, ...p.rejectedIds].find((id) => id >= vocabSize);
      if (big !== undefined) throw new PairsError(`line ${r.line}: token id ${big} is outside the vocabulary (size ${vocabSize})`);
      if (opts.maxTokens !== undefined && p.promptIds.length + Math.max(p.chosenIds.length, p.rejectedIds.length) > opts.maxTokens) {
        tooLong++;
        continue;
      }
      pairs.push({ index: pairs.length, ...p });
    } catch (e) {
      if (!opts.skipBad || !(e instanceof PairsError)) throw e;
      bad.push({ line: r.line, reason: e.message });
    }
  }
  return { pairs, tooLong, bad };
}

/**
 * Reads a pairs file and tokenizes it with a model folder's tokenizer: the pairs ready for runAnalysis.
 * Malformed lines fail (or, with skipBad, are skipped); pairs longer than maxTokens are skipped.
 */
export function loadPairs(file: string, modelDir: string, opts: { limit?: number; maxTokens?: number; skipBad?: boolean } = {}): Pair[] {
  const raw = readPairs(file, { skipBad: opts.skipBad });
  const tp = tokenizePairs(raw.pairs, loadTokenizer(modelDir), loadConfig(modelDir).vocabSize, opts);
  if (tp.pairs.length === 0) throw new PairsError(`no usable pairs in ${file} (${tp.tooLong} longer than maxTokens, ${raw.bad.length + tp.bad.length} malformed)`);
  return tp.pairs;
}
