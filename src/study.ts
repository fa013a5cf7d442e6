// What the `run` and `tune` commands do, as library calls: load the models and pairs from disk, run the
// analysis (or DPO), and write every output. The CLI only parses arguments into these calls and prints.
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import {
  ablateInWorkers,
  analyseInWorkers,
  defaultWorkers,
  runFlops,
  WASM_WORKER_BYTES,
  WORKER_MIN_FLOPS,
  WorkerPool,
} from "./parallel.js";
import type { AblationRunner } from "./analysis/controls.js";
import { findings } from "./analysis/findings.js";
import { analysePairs, finishAnalysis, layoutOf, planBatches } from "./analysis/run.js";
import { batchBytes, checkCompatible, makePlan } from "./analysis/scoring.js";
import {
  resolveSettings,
  runsAttribution,
  runsControls,
  SettingsError,
  type PairFormat,
  type RunSettings,
} from "./analysis/settings.js";
import { addTimes, type PairState, type Results, type RunCallbacks, type StageTimes } from "./analysis/schema.js";
import { transferStage, type TransferResult } from "./analysis/steering.js";
import { enableGradients } from "./model/gradients.js";
import { backendKind, initBackend, maxTensorBytes, usesWasmHeap } from "./model/backend.js";
import type { LlamaConfig } from "./model/config.js";
import { disposeModel, type LlamaModel } from "./model/llama.js";
import { backendCopies, loadModelSync, residentBytes, saveModelFolder, writeFileAtomic } from "./io/model.js";
import { shareResidency, type StreamedWeights } from "./io/stream.js";
import { readUsablePairs, type TokenizedPairs } from "./io/pairs.js";
import { requireChatTemplate, sharedChatTemplate } from "./io/chat.js";
import { hubSources } from "./io/hub.js";
import { modelFingerprint, OutputError, readSubspace, versions, writeRun, type RunMeta } from "./io/results.js";
import {
  clearRun,
  ensureWritableDir,
  fileHash,
  tokenizerHash,
  holdsRun,
  lockRun,
  removeIfEmpty,
  manifestDiff,
  readManifest,
  readStates,
  RunLog,
  writeManifest,
  type Manifest,
} from "./io/runfolder.js";
import { loadTokenizer, type TextTokenizer } from "./io/tokenizer.js";
import { DEFAULT_TUNE, evaluatePairs, tuneDPO, type StepMetrics, type TuneSettings } from "./train/dpo.js";

/** Where a study reads and writes, which pairs it keeps, and how it treats an existing run folder. */
export interface StudyInputs {
  base: string;
  tuned: string;
  pairs: string;
  out: string;
  limit?: number; // the first n usable pairs
  maxTokens?: number; // skip (and count) longer pairs; default: the model's max_position_embeddings
  skipBad?: boolean; // count and skip malformed lines instead of failing
  backend?: string; // force a tfjs backend
  resume?: boolean; // continue the run in `out` (its manifest must match)
  force?: boolean; // replace a run already in `out`
  shard?: { index: number; count: number }; // run only this part of the batches (phase 1); merge later
  memoryBudget?: number; // float32 weight bytes both models may keep on the backend (default: weightBudget)
  workers?: number; // worker threads for scoring and the mean-ablation control (default: defaultWorkers, or 1 for a run below WORKER_MIN_FLOPS); the numbers do not depend on it
}

/** Progress of a study: the analysis callbacks plus one-line notes (backend, pair counts, warnings). */
export interface StudyEvents extends RunCallbacks {
  onInfo?: (line: string) => void;
}

/** What a finished study returns; its files are in `out`. A shard returns results null (merge makes them). */
export interface StudyResult {
  results: Results | null;
  findings: string[];
  backend: string;
  out: string;
  pairs: { done: number; total: number; resumed: number };
}

/** Parses "i/n" (0 ≤ i < n) as a shard. */
export function parseShard(text: string): { index: number; count: number } {
  const m = /^(\d+)\/(\d+)$/.exec(text.trim());
  const index = Number(m?.[1]);
  const count = Number(m?.[2]);
  if (!m || !(count >= 1 && index < count))
    throw new OutputError(`--shard must be i/n with 0 ≤ i < n (e.g. 0/4), got "${text}"`);
  return { index, count };
}

/** The batches of a shard: every count-th batch, starting at index (whole batches, so numbers match a full run). */
export function shardBatches(
  all: Array<[number, number]>,
  shard: { index: number; count: number } | null | undefined,
): Array<[number, number]> {
  return shard ? all.filter((_, b) => b % shard.count === shard.index) : all;
}

/** Models and pairs of a study, loaded and checked. The caller disposes the models. */
interface Loaded {
  perModel: number; // backend bytes each model's weights may take
  base: LlamaModel;
  tuned: LlamaModel;
  tp: TokenizedPairs;
  tok: TextTokenizer | null;
  settings: RunSettings;
  manifest: Manifest;
}

/**
 * Pairs per batch when a model is streamed and no batch size was asked for. A batch's pairs share each layer's
 * read-in (~1 s per layer at 1B width), but every pair of it adds its cached sites and stacked patched runs to
 * each worker's heap: on the 1B-shaped pair, batches of 1 keep a 2-worker run within the BF16 weights + 2 GiB.
 */
export const STREAMED_BATCH = 1;

/**
 * Loads both models and the pairs, checks them against each other and the settings, and builds the manifest.
 * `settings.batchPairs` left out: DEFAULT_SETTINGS' unless a model is streamed (STREAMED_BATCH).
 */
function loadStudy(
  inputs: StudyInputs,
  settings: Partial<RunSettings>,
  backend: string,
  info: (line: string) => void,
): Loaded {
  const perModel = weightBudget(backend, inputs.memoryBudget) / 2;
  const base = loadModelSync(inputs.base, { memoryBudget: perModel, shared: true });
  let tuned: LlamaModel | null = null;
  try {
    tuned = loadModelSync(inputs.tuned, { memoryBudget: perModel, shared: true });
    shareResidency([base.source, tuned.source]);
    for (const m of [base, tuned]) {
      const need = backendCopies() * residentBytes(m.config);
      const name = m === base ? inputs.base : inputs.tuned;
      if (m.source && need <= perModel)
        info(
          `${name}: streamed (its head is larger than one GPU buffer may be, ${(maxTensorBytes() / 2 ** 20).toFixed(0)} MiB): the head goes in vocabulary chunks, embedding rows come from the stored weights`,
        );
      else if (m.source)
        info(
          `${name}: streamed (on the backend its weights take ${(need / 2 ** 30).toFixed(2)} GiB, more than its ${(perModel / 2 ** 30).toFixed(2)} GiB share of the memory budget): layers are brought in as needed`,
        );
    }
    checkCompatible(base, tuned);
    const streamedBatch = settings.batchPairs === undefined && !!(base.source || tuned.source);
    const s = resolveSettings(streamedBatch ? { ...settings, batchPairs: STREAMED_BATCH } : settings, base.config);
    if (streamedBatch)
      info(
        `batches of ${STREAMED_BATCH} pair, as a model is streamed (each pair of a batch adds its cached activations and stacked runs to every worker's heap; --batch to choose)`,
      );
    const tok = loadTokenizer(inputs.base);
    const tokFiles = [inputs.base, inputs.tuned].map((d) => path.join(d, "tokenizer.json"));
    if (
      tokFiles.every((f) => fs.existsSync(f)) &&
      !fs.readFileSync(tokFiles[0]!).equals(fs.readFileSync(tokFiles[1]!))
    ) {
      info("warning: the base and tuned tokenizer.json files differ; pairs are tokenized with the base model's");
    }
    const context = base.config.maxPositionEmbeddings;
    const maxTokens = inputs.maxTokens ?? context;
    if (maxTokens > context)
      info(
        `warning: --max-tokens ${maxTokens} lets pairs run past the model's context (max_position_embeddings ${context})`,
      );
    const tp = readUsablePairs(inputs.pairs, tok, base.config.vocabSize, {
      maxTokens,
      limit: inputs.limit,
      skipBad: inputs.skipBad,
      chat: s.format === "chat" ? sharedChatTemplate(inputs.base, inputs.tuned) : undefined,
    });
    const fingerprints = {
      base: modelFingerprint(inputs.base),
      tuned: modelFingerprint(inputs.tuned),
      pairs: fileHash(inputs.pairs),
      tokenizer: tokenizerHash(inputs.base),
    };
    if (fingerprints.base === fingerprints.tuned)
      info("warning: base and tuned are the same weights: every gap is 0 and no recovery can be measured");
    if (tp.identical)
      info(`warning: ${tp.identical} pairs have identical chosen and rejected responses (margin 0 by construction)`);
    const plan = makePlan(s, base.config.numLayers);
    const hub = hubSources({ base: inputs.base, tuned: inputs.tuned, pairs: inputs.pairs }); // repo and commit
    const manifest: Manifest = {
      schema: "prefprobe.manifest/2",
      inputs: { base: path.resolve(inputs.base), tuned: path.resolve(inputs.tuned), pairs: path.resolve(inputs.pairs) },
      ...(hub && { hub }),
      fingerprints,
      selection: {
        limit: inputs.limit ?? null,
        max_tokens: maxTokens,
        skip_bad: !!inputs.skipBad,
        memory_budget: inputs.memoryBudget ?? null,
      },
      settings: s as unknown as Record<string, unknown>,
      n_pairs: tp.pairs.length,
      batches: shardBatches(
        planBatches(tp.pairs, s.batchPairs, batchBudget(backend, base.config, perModel), (rows, T, scored) =>
          batchBytes(base.config, plan, rows, T, scored),
        ),
        inputs.shard,
      ),
      sums_size: layoutOf({ base, tuned }, plan).size,
      shard: inputs.shard ?? null,
    };
    return { perModel, base, tuned, tp, tok, settings: s, manifest };
  } catch (e) {
    disposeModel(base);
    if (tuned) disposeModel(tuned);
    throw e;
  }
}

/**
 * Backend bytes both models' weights may take together in a run on wasm by default (of its 4 GiB heap). A
 * bigger share buys nothing once a model is streamed (a forward pass reads layers in order, so an LRU that holds
 * fewer than all of them never hits) and costs heap: on a 4-layer Llama-3.2-1B-shaped pair at 2 × 160 tokens the
 * scoring pass grew the heap to 3.69 GiB with 2 GiB, 2.23 GiB with 1 GiB, and a 16-layer pair ran out at 2 GiB.
 */
export const WASM_PAIR_BUDGET = 2 ** 30;

/** Backend bytes both models' weights may take together: what was asked, else WASM_PAIR_BUDGET on wasm, elsewhere no limit. */
export function weightBudget(backend: string, asked?: number): number {
  return asked ?? (usesWasmHeap(backend) ? WASM_PAIR_BUDGET : Infinity);
}

/**
 * Heap the wasm backend uses beyond tracked tensors and packed weights (allocator slack, XNNPACK scratch,
 * uploads in flight): measured 1.2 GiB on the 1B-shaped pair above, so 1.5 GiB is set aside.
 */
export const WASM_SCRATCH = 1.5 * 2 ** 30;

/**
 * Bytes one scoring batch may use: on wasm the 4 GiB heap less WASM_SCRATCH, elsewhere 60% of the machine's
 * memory less 512 MiB, and less what both models keep on the backend (all their float32 weights, or their
 * share of the budget when streamed).
 */
export function batchBudget(backend: string, cfg: LlamaConfig, perModel: number): number {
  const weights = 2 * Math.min(backendCopies() * residentBytes(cfg), perModel);
  const memory = usesWasmHeap(backend) ? 4 * 2 ** 30 - WASM_SCRATCH : 0.6 * os.totalmem() - 512 * 2 ** 20;
  return memory - weights;
}

/** Adds the token strings of the attribution heatmap's pair (for the report's axis), when there is a tokenizer. */
function labelHeatmap(r: Results, tok: TextTokenizer | null): Results {
  const h = r.attribution?.heatmap;
  if (h && tok) {
    const text = (ids: number[]) => ids.map((id) => tok.idToToken(id) ?? String(id));
    h.tokens = {
      chosen: text([...h.ids.prompt, ...h.ids.chosen]),
      rejected: text([...h.ids.prompt, ...h.ids.rejected]),
    };
  }
  const p = r.position_map;
  if (p && tok) {
    // one label per position over the longer row: the prompt's tokens, then "chosen | rejected" where they differ
    const c = [...p.ids.prompt, ...p.ids.chosen];
    const j = [...p.ids.prompt, ...p.ids.rejected];
    const name = (id: number | undefined) => (id === undefined ? "·" : (tok.idToToken(id) ?? String(id)));
    p.tokens = Array.from({ length: Math.max(c.length, j.length) }, (_, t) =>
      t < p.ids.prompt.length ? name(c[t]) : `${name(c[t])} | ${name(j[t])}`,
    );
  }
  return r;
}

/** The meta a finished run writes beside its results. */
function runMeta(l: Loaded, backend: string, words: string[], t0: number): RunMeta {
  return {
    settings: l.settings,
    inputs: l.manifest.inputs,
    ...(l.manifest.hub && { hub: l.manifest.hub }),
    fingerprints: l.manifest.fingerprints,
    skipped: { too_long: l.tp.tooLong, malformed: l.tp.bad },
    notes: {
      boundary_merged: l.tp.merged,
      identical_responses: l.tp.identical,
      invalid_utf8: l.tp.invalidUtf8,
      same_models: l.manifest.fingerprints.base === l.manifest.fingerprints.tuned,
    },
    backend,
    versions: versions(),
    findings: words,
    total_ms: performance.now() - t0,
  };
}

/**
 * `prefprobe run` as a call: checks the settings and the output folder before any compute, loads both
 * models and the pairs, scores every pair (appending each batch to pairs.jsonl/pairs.bin, fsync'd), then
 * runs the dataset-level stages and writes results.json, report.html and activations.safetensors. With
 * `resume` it continues the run already in `out`; with `shard` it only scores that shard's pairs.
 */
export async function runStudy(
  inputs: StudyInputs,
  settings: Partial<RunSettings> = {},
  events: StudyEvents = {},
): Promise<StudyResult> {
  resolveSettings(settings);
  if (inputs.resume && inputs.force) throw new OutputError("--resume and --force exclude each other");
  return inRunFolder(inputs.out, { resume: !!inputs.resume, force: !!inputs.force }, () =>
    studyInFolder(inputs, settings, events),
  );
}

/**
 * Runs `work` with `out` made (if missing), checked and locked: a folder in use by another run, holding another
 * run (without --resume or --force), no run to resume, or files that are not a run, is refused before anything is
 * written. The lock is released at the end; on a failure the folders this call made are removed if still empty.
 */
export async function inRunFolder<T>(
  out: string,
  mode: { resume: boolean; force: boolean },
  work: () => Promise<T>,
): Promise<T> {
  const made = ensureWritableDir(out);
  let release = () => {};
  try {
    release = lockRun(out, { takeOver: mode.resume || mode.force || !holdsRun(out) });
    if (holdsRun(out) && !mode.resume && !mode.force)
      throw new OutputError(`--out ${out} holds another run (use --resume to continue it, or --force to replace it)`);
    if (mode.resume && !holdsRun(out)) throw new OutputError(`--resume: ${out} holds no run to continue`);
    const others = fs.readdirSync(out).filter((f) => f !== "run.lock");
    if (!holdsRun(out) && others.length && !mode.force)
      throw new OutputError(
        `--out ${out} holds files that are not a prefprobe run (${others.slice(0, 3).join(", ")}${others.length > 3 ? ", …" : ""}): choose a new or empty folder, or --force to write beside them`,
      );
    return await work();
  } catch (e) {
    release();
    release = () => {};
    removeIfEmpty(made);
    throw e;
  } finally {
    release();
  }
}

async function studyInFolder(
  inputs: StudyInputs,
  settings: Partial<RunSettings>,
  events: StudyEvents,
): Promise<StudyResult> {
  const info = events.onInfo ?? (() => {});
  const checked = resolveSettings(settings);
  const backend = await initBackend(inputs.backend);
  info(`backend: ${backend}`);
  const t0 = performance.now();
  if (runsAttribution(checked)) await enableGradients();
  const l = loadStudy(inputs, settings, backend, info);
  const loadMs = performance.now() - t0;
  const stages: StageTimes = {};
  const models = { base: l.base, tuned: l.tuned };
  try {
    info(
      `pairs: ${l.tp.pairs.length} used, ${l.tp.tooLong} skipped as longer than ${l.manifest.selection.max_tokens} tokens, ${l.tp.bad.length} malformed lines skipped` +
        (l.tp.merged ? `, ${l.tp.merged} with a token merged across the prompt/response seam` : "") +
        (l.tp.invalidUtf8
          ? `; warning: ${l.tp.invalidUtf8 === 1 ? "1 pair comes from a line that is" : `${l.tp.invalidUtf8} pairs come from lines that are`} not valid UTF-8, read with U+FFFD for each bad byte sequence`
          : ""),
    );
    let done: PairState[] = [];
    if (inputs.resume) {
      const before = readManifest(inputs.out);
      // a folder from before tokenizer fingerprints were recorded resumes without that check
      before.fingerprints.tokenizer ??= l.manifest.fingerprints.tokenizer;
      const diff = manifestDiff(before, l.manifest);
      if (diff.length)
        throw new OutputError(`--resume: the run in ${inputs.out} was made with other inputs: ${diff.join("; ")}`);
      done = readStates(inputs.out, l.manifest, { truncate: true });
      info(
        `resuming: ${done.length} of ${l.manifest.batches.reduce((a, [b, e]) => a + e - b, 0)} pairs already scored`,
      );
    } else {
      if (inputs.force) clearRun(inputs.out);
      writeManifest(inputs.out, l.manifest);
    }
    const log = new RunLog(inputs.out, l.manifest.sums_size);
    let doneBatches = 0;
    for (let k = 0; k < done.length; doneBatches++)
      k += l.manifest.batches[doneBatches]![1] - l.manifest.batches[doneBatches]![0];
    let fresh: PairState[];
    // worker threads, each with its own backend; streamed models lend them their stored bytes
    const small = runFlops(l.base.config, l.tp.pairs) < WORKER_MIN_FLOPS;
    const stored = {
      base: (l.base.source as StreamedWeights | undefined)?.stored,
      tuned: (l.tuned.source as StreamedWeights | undefined)?.stored,
    };
    const held = [stored.base, stored.tuned].reduce(
      (a, m) => a + [...(m?.values() ?? [])].reduce((b, t) => b + t.bytes.byteLength, 0),
      0,
    );
    const threads = inputs.workers ?? (small ? 1 : defaultWorkers(backend, held));
    if (
      !inputs.workers &&
      !small &&
      threads < defaultWorkers(backend, 0, { cores: os.availableParallelism(), memory: Infinity })
    ) {
      info(
        `${threads} worker thread(s), not one per core: each may take ${(WASM_WORKER_BYTES / 2 ** 30).toFixed(2)} GiB beside the ${(held / 2 ** 30).toFixed(2)} GiB of stored weights in this machine's ${(os.totalmem() / 2 ** 30).toFixed(1)} GiB (--workers to choose)`,
      );
    }
    // one pool for the run: what phase 1 has left to score, then the mean-ablation control's batches; each
    // worker's native matmul takes its share of the cores
    const poolSize = Math.min(
      threads,
      Math.max(
        l.manifest.batches.length - doneBatches,
        inputs.shard || !runsControls(l.settings) ? 0 : l.manifest.batches.length,
      ),
    );
    const kernelThreads = Math.max(1, Math.floor(os.availableParallelism() / Math.max(1, poolSize)));
    const init = {
      base: inputs.base,
      tuned: inputs.tuned,
      backend: backendKind()!,
      threads: kernelThreads,
      memoryBudget: l.perModel,
      settings: l.settings,
      pairs: l.tp.pairs,
      stored,
    };
    const pool = poolSize > 1 ? new WorkerPool(init, poolSize) : null;
    try {
      try {
        const onPairs = (st: PairState[]) => (log.append(st), events.onPairs?.(st));
        const onTimes = (t: StageTimes) => (addTimes(stages, t), events.onTimes?.(t));
        const todo = l.manifest.batches.slice(doneBatches);
        if (pool && todo.length > 1) {
          info(`scoring on ${Math.min(pool.size, todo.length)} worker threads`);
          fresh = await analyseInWorkers(pool, todo, { ...events, onPairs, onTimes }, done.length);
        } else
          fresh = await analysePairs(
            models,
            l.tp.pairs,
            l.settings,
            { ...events, onPairs, onTimes },
            { batches: todo, done: done.length },
          );
      } finally {
        log.close();
      }
      const scoringMs = performance.now() - t0 - loadMs;
      const states = [...done, ...fresh];
      const total = l.manifest.batches.reduce((a, [b, e]) => a + e - b, 0);
      if (inputs.shard)
        return {
          results: null,
          findings: [],
          backend,
          out: inputs.out,
          pairs: { done: states.length, total, resumed: done.length },
        };
      // the workers end once the mean-ablation control is done: the stages after it run on this thread, and idle
      // workers would keep their heaps
      const ablate = pool && runsControls(l.settings) && l.manifest.batches.length > 1;
      if (ablate) info(`mean-ablation control on ${Math.min(pool.size, l.manifest.batches.length)} worker threads`);
      else await pool?.close();
      const runners: { ablate?: AblationRunner } = ablate
        ? { ablate: (...a) => ablateInWorkers(pool, events.onProgress)(...a).finally(() => pool.close()) }
        : {};
      const results = labelHeatmap(
        await finishAnalysis(models, l.tp.pairs, states, l.settings, events, l.manifest.batches, runners),
        l.tok,
      );
      results.timings_ms = { loading: loadMs, scoring_and_patching: scoringMs, ...stages, ...results.timings_ms };
      const words = findings(results);
      await writeRun(inputs.out, results, runMeta(l, backend, words, t0), l.tp.pairs);
      return {
        results,
        findings: words,
        backend,
        out: inputs.out,
        pairs: { done: states.length, total, resumed: done.length },
      };
    } finally {
      await pool?.close();
    }
  } finally {
    disposeModel(l.base);
    disposeModel(l.tuned);
  }
}

/**
 * `prefprobe merge` as a call: checks that the shard folders are shards of one run and together hold every
 * pair once, then runs the dataset-level stages (which need all pairs) and writes a complete run into `out`
 * (pairs.jsonl and pairs.bin in pair order, results.json, report.html, activations.safetensors): the same
 * results as one unsharded run.
 */
export async function mergeShards(
  out: string,
  shardDirs: string[],
  events: StudyEvents & { backend?: string; force?: boolean } = {},
): Promise<StudyResult> {
  if (shardDirs.length === 0) throw new OutputError("merge needs at least one shard folder");
  const manifests = shardDirs.map((d) => readManifest(d));
  const first = manifests[0]!;
  manifests.forEach((m, i) => {
    const diff = manifestDiff(first, m, true).filter((d) => !d.startsWith("batches"));
    if (diff.length)
      throw new OutputError(`${shardDirs[i]} is not a shard of the same run as ${shardDirs[0]}: ${diff.join("; ")}`);
  });
  const count = first.shard?.count ?? 1;
  const seen = new Map<number, string>();
  manifests.forEach((m, i) => {
    if (!m.shard)
      throw new OutputError(
        `${shardDirs[i]} is a whole run (made without --shard), not a shard: there is nothing to merge`,
      );
    if ((m.shard?.count ?? 1) !== count)
      throw new OutputError(`${shardDirs[i]}: shard of ${m.shard?.count ?? 1}, others of ${count}`);
    const idx = m.shard?.index ?? 0;
    if (seen.has(idx))
      throw new OutputError(`shard ${idx}/${count} given twice (${seen.get(idx)} and ${shardDirs[i]})`);
    seen.set(idx, shardDirs[i]!);
  });
  const missing = Array.from({ length: count }, (_, i) => i).filter((i) => !seen.has(i));
  if (missing.length)
    throw new OutputError(
      `missing shard${missing.length > 1 ? "s" : ""} ${missing.map((i) => `${i}/${count}`).join(", ")}`,
    );
  return inRunFolder(out, { resume: false, force: !!events.force }, () => mergeInto(out, shardDirs, manifests, events));
}

/** mergeShards' work once the shards are checked and `out` is locked. */
async function mergeInto(
  out: string,
  shardDirs: string[],
  manifests: Manifest[],
  events: StudyEvents & { backend?: string; force?: boolean },
): Promise<StudyResult> {
  const info = events.onInfo ?? (() => {});
  const first = manifests[0]!;
  const backend = await initBackend(events.backend);
  info(`backend: ${backend}`);
  const t0 = performance.now();
  const inputs: StudyInputs = {
    base: first.inputs.base,
    tuned: first.inputs.tuned,
    pairs: first.inputs.pairs,
    out,
    limit: first.selection.limit ?? undefined,
    maxTokens: first.selection.max_tokens,
    skipBad: first.selection.skip_bad,
    memoryBudget: first.selection.memory_budget ?? undefined,
  };
  const l = loadStudy(inputs, first.settings as unknown as RunSettings, backend, info);
  try {
    const diff = manifestDiff({ ...first, batches: l.manifest.batches, shard: null }, l.manifest);
    if (diff.length) throw new OutputError(`the shards' inputs have changed since they ran: ${diff.join("; ")}`);
    const states: PairState[] = [];
    manifests.forEach((m, i) => {
      const got = readStates(shardDirs[i]!, m);
      const want = m.batches.reduce((a, [b, e]) => a + e - b, 0);
      if (got.length !== want)
        throw new OutputError(
          `${shardDirs[i]} holds ${got.length} of its ${want} pairs: finish it with --resume first`,
        );
      states.push(...got);
    });
    states.sort((a, b) => a.record.index - b.record.index);
    const gaps = states.length !== l.tp.pairs.length || states.some((st, i) => st.record.index !== i);
    if (gaps)
      throw new OutputError(
        `the shards hold ${states.length} pairs but the run has ${l.tp.pairs.length}, not each once: were they planned with other batches (another machine's memory budget)?`,
      );
    if (events.force) clearRun(out);
    writeManifest(out, l.manifest);
    const log = new RunLog(out, l.manifest.sums_size);
    try {
      log.append(states);
    } finally {
      log.close();
    }
    const results = labelHeatmap(
      await finishAnalysis(
        { base: l.base, tuned: l.tuned },
        l.tp.pairs,
        states,
        l.settings,
        events,
        l.manifest.batches,
      ),
      l.tok,
    );
    const words = findings(results);
    await writeRun(out, results, runMeta(l, backend, words, t0), l.tp.pairs);
    return { results, findings: words, backend, out, pairs: { done: states.length, total: states.length, resumed: 0 } };
  } finally {
    disposeModel(l.base);
    disposeModel(l.tuned);
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
  format?: PairFormat; // how text pairs are read (default raw); chat uses the model's chat template
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
  if (fs.existsSync(out) && !inputs.force)
    throw new OutputError(`--out ${out} already exists (use --force to replace it)`);
  if (!fs.existsSync(path.dirname(path.resolve(out))))
    throw new OutputError(`cannot write ${out}: folder ${path.dirname(path.resolve(out))} does not exist`);
  const backend = await initBackend(inputs.backend);
  events.onInfo?.(`backend: ${backend}`);
  const model = loadModelSync(inputs.model);
  try {
    const tok = loadTokenizer(inputs.model);
    const chat = inputs.format === "chat" ? requireChatTemplate(inputs.model) : undefined;
    const load = (file: string, limit?: number) =>
      readUsablePairs(file, tok, model.config.vocabSize, { maxTokens: inputs.maxTokens, limit, chat });
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
      hub: hubSources({ base_model: inputs.model, pairs: inputs.pairs, eval: inputs.eval }) ?? null,
      format: inputs.format ?? "raw",
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
    saveModelFolder(res.model, out, {
      copyFrom: inputs.model,
      extraFiles: { "tune.json": JSON.stringify(record, null, 1) + "\n" },
    });
    for (const t of res.ownTensors) t.dispose();
    return { trained: res.trained, steps: res.history.length, trainMs, last, evaluation, rank: s.rank };
  } finally {
    disposeModel(model);
  }
}

/** What `prefprobe apply-subspace` reads. */
export interface TransferInputs {
  subspace: string; // a run's subspace.safetensors
  base: string;
  tuned: string;
  pairs: string;
  out: string; // the JSON file to write
  limit?: number;
  maxTokens?: number;
  backend?: string;
  memoryBudget?: number;
  force?: boolean;
}

/**
 * `prefprobe apply-subspace` as a call: patches a saved subspace into another model pair of the same width (or
 * the same pair on other pairs), beside the whole-layer patch and a random subspace, and steers the base model
 * with the saved mean difference; writes the TransferResult as JSON.
 */
export async function runTransfer(
  inputs: TransferInputs,
  settings: Partial<RunSettings> = {},
  events: StudyEvents = {},
): Promise<TransferResult> {
  const s = resolveSettings(settings);
  if (fs.existsSync(inputs.out) && !inputs.force)
    throw new OutputError(`--out ${inputs.out} already exists (use --force to replace it)`);
  if (!fs.existsSync(path.dirname(path.resolve(inputs.out))))
    throw new OutputError(
      `cannot write ${inputs.out}: folder ${path.dirname(path.resolve(inputs.out))} does not exist`,
    );
  const sub = readSubspace(inputs.subspace);
  const backend = await initBackend(inputs.backend);
  events.onInfo?.(`backend: ${backend}`);
  const perModel = weightBudget(backend, inputs.memoryBudget) / 2;
  const base = loadModelSync(inputs.base, { memoryBudget: perModel });
  try {
    const tuned = loadModelSync(inputs.tuned, { memoryBudget: perModel });
    shareResidency([base.source, tuned.source]);
    try {
      checkCompatible(base, tuned);
      if (sub.meanDiff.length !== base.config.hiddenSize)
        throw new SettingsError(
          `--subspace ${inputs.subspace} is for hidden size ${sub.meanDiff.length}; ${inputs.base} has ${base.config.hiddenSize}`,
        );
      if (sub.layer >= base.config.numLayers)
        throw new SettingsError(
          `--subspace ${inputs.subspace} is for layer ${sub.layer}; ${inputs.base} has ${base.config.numLayers} layers`,
        );
      const tp = readUsablePairs(inputs.pairs, loadTokenizer(inputs.base), base.config.vocabSize, {
        maxTokens: inputs.maxTokens ?? base.config.maxPositionEmbeddings,
        limit: inputs.limit,
        chat: s.format === "chat" ? sharedChatTemplate(inputs.base, inputs.tuned) : undefined,
      });
      events.onInfo?.(`pairs: ${tp.pairs.length} used, ${tp.tooLong} skipped as too long`);
      events.onStage?.(`subspace at layer ${sub.layer}`, tp.pairs.length);
      let done = 0;
      const r = await transferStage({ base, tuned }, tp.pairs, sub, s, (c) => events.onProgress?.((done += c)));
      writeFileAtomic(
        inputs.out,
        JSON.stringify(
          {
            schema: "prefprobe.transfer/1",
            inputs: {
              subspace: path.resolve(inputs.subspace),
              base: path.resolve(inputs.base),
              tuned: path.resolve(inputs.tuned),
              pairs: path.resolve(inputs.pairs),
            },
            hub: hubSources({ base: inputs.base, tuned: inputs.tuned, pairs: inputs.pairs }) ?? null,
            settings: s,
            backend,
            versions: versions(),
            ...r,
          },
          null,
          1,
        ) + "\n",
      );
      return r;
    } finally {
      disposeModel(tuned);
    }
  } finally {
    disposeModel(base);
  }
}
