// What the `run` and `tune` commands do, as library calls: load the models and pairs from disk, run the
// analysis (or DPO), and write every output. The CLI only parses arguments into these calls and prints.
import * as fs from "node:fs";
import * as path from "node:path";
import { findings } from "./analysis/findings.js";
import { runAnalysis } from "./analysis/run.js";
import { checkCompatible } from "./analysis/scoring.js";
import { resolveSettings, type Results, type RunCallbacks, type RunSettings } from "./analysis/settings.js";
import { initBackend } from "./model/backend.js";
import { disposeModel } from "./model/llama.js";
import { loadModelSync, saveModelFolder } from "./io/model.js";
import { PairsError, readPairs, tokenizePairs } from "./io/pairs.js";
import { OutputError, PairsLog, prepareOutDir, versions, writeRun } from "./io/results.js";
import { loadTokenizer } from "./io/tokenizer.js";
import { DEFAULT_TUNE, evaluatePairs, tuneDPO, type StepMetrics, type TuneSettings } from "./train/dpo.js";

/** Where a study reads and writes, and which pairs it keeps. */
export interface StudyInputs {
  base: string;
  tuned: string;
  pairs: string;
  out: string;
  limit?: number; // the first n usable pairs
  maxTokens?: number; // skip (and count) longer pairs
  skipBad?: boolean; // count and skip malformed lines instead of failing
  backend?: string; // force a tfjs backend
}

/** Progress of a study: the analysis callbacks plus one-line notes (backend, pair counts, warnings). */
export interface StudyEvents extends RunCallbacks {
  onInfo?: (line: string) => void;
}

/** What a finished study returns; its files are in `out`. */
export interface StudyResult {
  results: Results;
  findings: string[];
  backend: string;
  out: string;
}

/**
 * `prefprobe run` as a call: checks the settings and the output folder before any compute, loads both
 * models and the pairs, runs the analysis (streaming pairs.jsonl), then writes results.json, report.html
 * and activations.safetensors.
 */
export async function runStudy(inputs: StudyInputs, settings: Partial<RunSettings> = {}, events: StudyEvents = {}): Promise<StudyResult> {
  const info = events.onInfo ?? (() => {});
  const checked = resolveSettings(settings);
  prepareOutDir(inputs.out);
  const backend = await initBackend(inputs.backend);
  info(`backend: ${backend}`);
  const t0 = performance.now();
  const base = loadModelSync(inputs.base);
  let tuned: ReturnType<typeof loadModelSync> | null = null;
  try {
    tuned = loadModelSync(inputs.tuned);
    checkCompatible(base, tuned);
    const s = resolveSettings(checked, base.config);
    const tok = loadTokenizer(inputs.base);
    const tokFiles = [inputs.base, inputs.tuned].map((d) => path.join(d, "tokenizer.json"));
    if (tokFiles.every((f) => fs.existsSync(f)) && !fs.readFileSync(tokFiles[0]!).equals(fs.readFileSync(tokFiles[1]!))) {
      info("warning: the base and tuned tokenizer.json files differ; pairs are tokenized with the base model's");
    }
    const raw = readPairs(inputs.pairs, { skipBad: inputs.skipBad });
    const tp = tokenizePairs(raw.pairs, tok, base.config.vocabSize, { maxTokens: inputs.maxTokens, limit: inputs.limit, skipBad: inputs.skipBad });
    const malformed = raw.bad.length + tp.bad.length;
    if (tp.pairs.length === 0) throw new PairsError(`no usable pairs in ${inputs.pairs} (${tp.tooLong} longer than --max-tokens, ${malformed} malformed)`);
    info(`pairs: ${tp.pairs.length} used, ${tp.tooLong} skipped as longer than --max-tokens, ${malformed} malformed lines skipped`);
    const log = new PairsLog(path.join(inputs.out, "pairs.jsonl"));
    let results: Results;
    try {
      results = await runAnalysis(base, tuned, tp.pairs, s, { ...events, onPair: (rec) => (log.write(rec), events.onPair?.(rec)) });
    } finally {
      log.close();
    }
    const words = findings(results);
    const meta = {
      settings: s,
      inputs: { base: inputs.base, tuned: inputs.tuned, pairs: inputs.pairs },
      skipped: { too_long: tp.tooLong, malformed: [...raw.bad, ...tp.bad] },
      backend,
      versions: versions(),
      findings: words,
      total_ms: performance.now() - t0,
    };
    await writeRun(inputs.out, results, meta, tp.pairs);
    return { results, findings: words, backend, out: inputs.out };
  } finally {
    disposeModel(base);
    if (tuned) disposeModel(tuned);
  }
}

/** Where DPO reads and writes. */
export interface TuneInputs {
  model: string; // the starting model, also the DPO reference
  pairs: string;
  out: string; // the tuned model folder (replaced only with force)
  eval?: string; // held-out pairs to evaluate before and after
  limit?: number;
  maxTokens?: number;
  force?: boolean;
  backend?: string;
  command?: string; // recorded in tune.json
}

/** What DPO returns besides the folder it wrote. */
export interface TuneResult {
  trained: string[];
  steps: number;
  trainMs: number;
  last: StepMetrics;
  evaluation: ReturnType<typeof evaluatePairs> | null;
  rank: number | null;
}

/** `prefprobe tune` as a call: DPO on the pairs, then the tuned model folder (with tune.json) written whole. */
export async function runTune(
  inputs: TuneInputs,
  settings: Partial<TuneSettings> = {},
  events: { onInfo?: (line: string) => void; onStep?: (m: StepMetrics, total: number) => void } = {},
): Promise<TuneResult> {
  const s: TuneSettings = { ...DEFAULT_TUNE, ...settings };
  const out = inputs.out;
  if (fs.existsSync(out) && !inputs.force) throw new OutputError(`--out ${out} already exists (use --force to replace it)`);
  if (!fs.existsSync(path.dirname(path.resolve(out)))) throw new OutputError(`cannot write ${out}: folder ${path.dirname(path.resolve(out))} does not exist`);
  const backend = await initBackend(inputs.backend);
  events.onInfo?.(`backend: ${backend}`);
  const model = loadModelSync(inputs.model);
  try {
    const tok = loadTokenizer(inputs.model);
    const load = (file: string, limit?: number) => {
      const tp = tokenizePairs(readPairs(file).pairs, tok, model.config.vocabSize, { maxTokens: inputs.maxTokens, limit });
      if (tp.pairs.length === 0) throw new PairsError(`no usable pairs in ${file} (${tp.tooLong} longer than --max-tokens)`);
      return tp;
    };
    const train = load(inputs.pairs, inputs.limit);
    const evalSet = inputs.eval ? load(inputs.eval) : null;
    events.onInfo?.(`training pairs: ${train.pairs.length} (${train.tooLong} skipped as too long)`);
    const t0 = performance.now();
    const res = await tuneDPO(model, train.pairs, s, events.onStep);
    const trainMs = performance.now() - t0;
    const evaluation = evalSet ? evaluatePairs(model, res.model, evalSet.pairs) : null;
    const last = res.history[res.history.length - 1]!;
    const record = {
      producer: "prefprobe tune",
      command: inputs.command ?? "",
      base_model: inputs.model,
      pairs: inputs.pairs,
      n_pairs: train.pairs.length,
      settings: s,
      trained: res.trained,
      backend,
      versions: versions(),
      train_ms: trainMs,
      final_step: last,
      history: res.history,
      held_out: evaluation,
    };
    saveModelFolder(res.model, out, { copyFrom: inputs.model, extraFiles: { "tune.json": JSON.stringify(record, null, 1) + "\n" } });
    for (const t of res.ownTensors) t.dispose();
    return { trained: res.trained, steps: res.history.length, trainMs, last, evaluation, rank: s.rank };
  } finally {
    disposeModel(model);
  }
}
