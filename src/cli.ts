#!/usr/bin/env node
// prefprobe command line: parses arguments and calls the library. Errors print as one line (stack with --debug).
import * as fs from "node:fs";
import * as path from "node:path";
import { Command, CommanderError, Option } from "commander";
import * as tf from "@tensorflow/tfjs-core";
import { readValues } from "./model/read.js";
import cliProgress from "cli-progress";
import { explainBackendError, initBackend, BACKENDS } from "./model/backend.js";
import { disposeModel, type Hooks, type LlamaModel } from "./model/llama.js";
import { logitsAndResid } from "./model/resid.js";
import { greedy } from "./model/generate.js";
import { loadModelSync } from "./io/model.js";
import { loadTokenizer, type TextTokenizer } from "./io/tokenizer.js";
import { writeSafetensors } from "./io/safetensors.js";
import { OutputError, readSubspace } from "./io/results.js";
import { convertLlama2c } from "./io/llama2c.js";
import { resolveHubFile, resolveModel, type HubOptions } from "./io/hub.js";
import { integerText, RUN_SETTINGS, type PairFormat, type RunSettings, type SettingSpec } from "./analysis/settings.js";
import { summaryTable, transferFindings } from "./analysis/findings.js";
import { steeringHooks, type SavedSubspace } from "./analysis/steering.js";
import { DEFAULT_TUNE, SCHEDULES, type Schedule, type TuneSettings } from "./train/dpo.js";

/** A reward accuracy for printing: two decimals, or "n/a" when every pair was within float32 noise. */
const accuracy = (a: number | null): string => (a === null ? "n/a (within float32 noise)" : a.toFixed(2));
import {
  mergeShards,
  parseShard,
  runStudy,
  runTransfer,
  runTune,
  WASM_PAIR_BUDGET,
  type StudyEvents,
  type StudyResult,
} from "./study.js";
import { Interrupted } from "./analysis/schema.js";
import { withFlags } from "./cli-flags.js";

/** This package's version, from its package.json (one folder above dist/src or src). */
const PACKAGE_VERSION = (
  JSON.parse(
    fs.readFileSync(
      new URL(
        fs.existsSync(new URL("../../package.json", import.meta.url)) ? "../../package.json" : "../package.json",
        import.meta.url,
      ),
      "utf8",
    ),
  ) as { version: string }
).version;

/** An error in what the user asked for, reported without a stack trace. */
export class UsageError extends Error {
  override name = "UsageError";
}

const program = new Command();
program
  .name("prefprobe")
  .description("Causal probes of preference tuning on a hand-written Llama forward pass (TensorFlow.js)")
  .version(PACKAGE_VERSION, "-V, --version", "print prefprobe's version")
  .option("--debug", "print stack traces on errors")
  .exitOverride()
  .configureOutput({ outputError: () => {} }); // main() prints every error as one line

const backendOption = () =>
  new Option("--backend <name>", "tfjs backend (default: best installed)").choices([...BACKENDS]);
const budgetOption = (what: string, wasmDefault: number) =>
  new Option(
    "--memory-budget <GiB>",
    `backend memory the weights of ${what} may take; a model needing more is streamed layer by layer (default: ${wasmDefault} on wasm, no limit elsewhere)`,
  ).argParser((v) => {
    const n = Number(v);
    if (v.trim() === "" || !(n > 0) || !Number.isFinite(n))
      throw new UsageError(`--memory-budget must be a positive number of GiB, got "${v}"`);
    return n * 2 ** 30;
  });

const revisionOption = () =>
  new Option(
    "--revision <rev>",
    "branch, tag or commit of Hugging Face model ids (default main; org/name@rev gives one id its own)",
  );

/**
 * Runs a Hub lookup with its notes and download progress on stderr, so stdout stays the command's output: a
 * progress bar on a terminal, else one line per file.
 */
async function fromHub<T>(resolve: (opts: HubOptions) => Promise<T>, revision?: string): Promise<T> {
  const bar = new cliProgress.SingleBar(
    { format: "{repo} [{bar}] {got}/{size} MB | {file}", hideCursor: true },
    cliProgress.Presets.shades_classic,
  );
  const tty = process.stderr.isTTY;
  const mb = (n: number) => (n / 1e6).toFixed(1);
  let file = "";
  let started = false;
  const stopBar = () => {
    if (started) bar.stop();
    started = false;
  };
  try {
    return await resolve({
      revision,
      env: process.env,
      onInfo: (line) => {
        stopBar(); // a note ends the bar's line rather than writing into it
        process.stderr.write(line + "\n");
      },
      onDownload: (p) => {
        const values = { repo: p.repo, file: p.file, got: mb(p.done), size: mb(p.total) };
        if (!tty) {
          if (p.file !== file) process.stderr.write(`  ${p.repo}: ${p.file}\n`);
        } else if (started) bar.update(p.done, values);
        else {
          bar.start(p.total, p.done, values);
          started = true;
        }
        file = p.file;
      },
    });
  } finally {
    stopBar();
  }
}

/** A model flag's folder: the path as given, or a Hugging Face id (org/name[@rev]) resolved into the local cache. */
const modelDir = (spec: string, revision?: string) => fromHub((opts) => resolveModel(spec, opts), revision);

/** Replaces parsed model flags with local folders and pairs-file flags (when given) with local files (hf:// ones fetched). */
async function localInputs(o: Record<string, unknown>, models: string[], files: string[]): Promise<void> {
  for (const k of models) o[k] = await modelDir(String(o[k]), o.revision as string | undefined);
  for (const k of files) if (o[k] !== undefined) o[k] = await fromHub((opts) => resolveHubFile(String(o[k]), opts));
}

async function startBackend(force?: string): Promise<string> {
  const name = await initBackend(force);
  process.stderr.write(`backend: ${name}\n`);
  return name;
}

function parseIds(s: string, vocab: number): number[] {
  const ids = s.split(",").map((x) => x.trim());
  if (ids.length === 0 || ids.some((x) => !/^\d+$/.test(x)))
    throw new UsageError(`--ids must be comma-separated non-negative integers, got "${s}"`);
  const out = ids.map(Number);
  const bad = out.find((i) => i >= vocab);
  if (bad !== undefined) throw new UsageError(`--ids: token id ${bad} is outside the vocabulary (size ${vocab})`);
  return out;
}

function needTokenizer(tok: TextTokenizer | null, dir: string): TextTokenizer {
  if (!tok) throw new UsageError(`${dir} has no tokenizer.json: use --ids instead of --text`);
  return tok;
}

/** How token `id` reads when appended to `ids` (decoding alone would drop a leading space). */
const show = (tok: TextTokenizer | null, ids: number[], id: number) => {
  if (!tok) return `#${id}`;
  const before = tok.decode(ids);
  const after = tok.decode([...ids, id]);
  return JSON.stringify(after.startsWith(before) ? after.slice(before.length) : tok.decode([id]));
};

program
  .command("logits")
  .description("run a model on text or token ids; print the top next tokens and optionally save logits and residuals")
  .requiredOption("--model <dir>", "Hugging Face Llama folder (config.json + safetensors), or a Hub id org/name[@rev]")
  .addOption(revisionOption())
  .option("--text <text>", "text to tokenize (the tokenizer's settings decide BOS)")
  .option("--ids <ids>", "comma-separated token ids, used as-is (no BOS added)")
  .option("--out <file>", "write logits F32 [T, V] (and resid) to this safetensors file")
  .option("--resid", "also write resid F32 [L+1, T, H]: embedding output, then after each block")
  .option("--top <k>", "how many next tokens to show", "5")
  .addOption(backendOption())
  .addOption(budgetOption("the model", 3))
  .action(
    async (o: {
      model: string;
      text?: string;
      ids?: string;
      out?: string;
      resid?: boolean;
      top: string;
      backend?: string;
      memoryBudget?: number;
      revision?: string;
    }) => {
      if ((o.text === undefined) === (o.ids === undefined)) throw new UsageError("give exactly one of --text or --ids");
      if (o.resid && !o.out) throw new UsageError("--resid needs --out");
      const top = Number(o.top);
      if (!Number.isInteger(top) || top < 1) throw new UsageError(`--top must be a positive integer, got "${o.top}"`);
      if (o.out) checkWritable(o.out);
      o.model = await modelDir(o.model, o.revision);
      await startBackend(o.backend);
      const model = loadModelSync(o.model, { memoryBudget: o.memoryBudget });
      const tok = loadTokenizer(o.model);
      const ids =
        o.ids !== undefined ? parseIds(o.ids, model.config.vocabSize) : needTokenizer(tok, o.model).encode(o.text!);
      if (ids.length === 0) throw new UsageError("the input has no tokens");
      const { logits, resid } = logitsAndResid(model, ids, !!o.resid);
      const last = readValues(() => tf.softmax(tf.slice(logits, [ids.length - 1, 0], [1, -1])));
      const order = Array.from(last.keys())
        .sort((a, b) => last[b]! - last[a]!)
        .slice(0, top);
      console.log(`tokens (${ids.length}): ${ids.join(" ")}`);
      console.log(`top ${order.length} next tokens after position ${ids.length - 1}:`);
      for (const id of order)
        console.log(`  ${(100 * last[id]!).toFixed(2).padStart(6)}%  ${String(id).padStart(6)}  ${show(tok, ids, id)}`);
      if (o.out) {
        const tensors: Parameters<typeof writeSafetensors>[1] = {
          input_ids: { dtype: "I32", shape: [ids.length], data: ids },
          logits: { dtype: "F32", shape: logits.shape, data: logits.dataSync() as Float32Array },
        };
        if (resid) tensors.resid = { dtype: "F32", shape: resid.shape, data: resid.dataSync() as Float32Array };
        writeSafetensors(o.out, tensors, { producer: "prefprobe logits", model: path.resolve(o.model) });
        console.log(`wrote ${o.out}`);
      }
      logits.dispose();
      resid?.dispose();
      disposeModel(model);
    },
  );

/** What generate steers with: the run's subspace file, what it holds, and β. */
type Steering = { file: string; sub: SavedSubspace; beta: number };

/** generate's --steer and --beta, or null without them. */
function steeringFlags(o: { steer?: string; beta?: string }): Steering | null {
  if (o.steer === undefined && o.beta === undefined) return null;
  if (o.steer === undefined) throw new UsageError("--beta needs --steer (a run's subspace.safetensors)");
  if (o.beta === undefined) throw new UsageError("--steer needs --beta (the steering strength)");
  const beta = Number(o.beta);
  if (o.beta.trim() === "" || !Number.isFinite(beta))
    throw new UsageError(`--beta must be a finite number, got "${o.beta}"`);
  try {
    return { file: o.steer, sub: readSubspace(o.steer), beta };
  } catch (e) {
    // readSubspace names the file as apply-subspace's --subspace; here it came from --steer
    if (e instanceof OutputError) throw new UsageError(e.message.replace(/^subspace /, "--steer "));
    throw e;
  }
}

/**
 * Prints the unsteered and the steered continuation, labelled, after saying what steers it: the run's mean
 * difference h_tuned − h_base at its layer, times β, added to that layer's resid_post at every position (the
 * intervention whose margins the run's steering rows report). `generate(hooks)` decodes with those hooks.
 */
function printSteered(model: LlamaModel, modelName: string, s: Steering, generate: (hooks?: Hooks) => string): void {
  const { hiddenSize: H, numLayers: L } = model.config;
  if (s.sub.meanDiff.length !== H)
    throw new UsageError(`--steer ${s.file} is for hidden size ${s.sub.meanDiff.length}; ${modelName} has ${H}`);
  if (s.sub.layer >= L)
    throw new UsageError(`--steer ${s.file} is for layer ${s.sub.layer}; ${modelName} has ${L} layers`);
  const hooks = steeringHooks(model.config, { layer: s.sub.layer, direction: s.sub.meanDiff, beta: s.beta });
  const norm = Math.hypot(...s.sub.meanDiff);
  console.log(
    `steering: β = ${s.beta} × the mean difference h_tuned − h_base at layer ${s.sub.layer} (norm ${norm.toFixed(4)}, from ${s.file}), added to ${Object.keys(hooks)[0]} at every position`,
  );
  console.log(`unsteered:\n${generate()}`);
  console.log(`steered (layer ${s.sub.layer}, β = ${s.beta}):\n${generate(hooks)}`);
}

program
  .command("generate")
  .description("greedy decoding from text (or from BOS when --text is empty)")
  .requiredOption("--model <dir>", "Hugging Face Llama folder, or a Hub id org/name[@rev]")
  .addOption(revisionOption())
  .option("--text <text>", "prompt text (the tokenizer's settings decide BOS)", "")
  .option("--ids <ids>", "comma-separated prompt token ids, used as-is (instead of --text)")
  .option("--steps <n>", "tokens to generate (at most up to the model's context)", "50")
  .option("--steer <file>", "also generate steered by a run's subspace.safetensors: its mean difference at its layer")
  .option("--beta <β>", "with --steer: add β × the mean difference to that layer's resid_post, at every position")
  .addOption(backendOption())
  .addOption(budgetOption("the model", 3))
  .action(
    async (o: {
      model: string;
      text: string;
      ids?: string;
      steps: string;
      steer?: string;
      beta?: string;
      backend?: string;
      memoryBudget?: number;
      revision?: string;
    }) => {
      const steps = Number(o.steps);
      if (!Number.isInteger(steps) || steps < 1)
        throw new UsageError(`--steps must be a positive integer, got "${o.steps}"`);
      if (o.ids !== undefined && o.text !== "") throw new UsageError("give --text or --ids, not both");
      const steering = steeringFlags(o);
      o.model = await modelDir(o.model, o.revision);
      await startBackend(o.backend);
      const model = loadModelSync(o.model, { memoryBudget: o.memoryBudget });
      const tok = o.ids !== undefined ? loadTokenizer(o.model) : needTokenizer(loadTokenizer(o.model), o.model);
      const prompt =
        o.ids !== undefined
          ? parseIds(o.ids, model.config.vocabSize)
          : o.text === "" && tok!.bosId !== null
            ? [tok!.bosId]
            : tok!.encode(o.text);
      if (prompt.length === 0) throw new UsageError("the prompt has no tokens (give --text or --ids)");
      const context = model.config.maxPositionEmbeddings;
      if (prompt.length + steps > context)
        throw new UsageError(
          `--steps ${steps} after a ${prompt.length}-token prompt would run past the model's context of ${context} tokens (use at most --steps ${Math.max(0, context - prompt.length)})`,
        );
      const eos = model.config.eosTokenId;
      const stopAt = eos === null ? [] : Array.isArray(eos) ? eos : [eos];
      const text = (out: number[]) =>
        tok ? tok.decode([...prompt, ...out], { skipSpecialTokens: true }) : [...prompt, ...out].join(" ");
      if (steering)
        printSteered(model, o.model, steering, (hooks) => text(greedy(model, prompt, steps, { stopAt, hooks })));
      else console.log(text(greedy(model, prompt, steps, { stopAt })));
      disposeModel(model);
    },
  );

program
  .command("convert-llama2c")
  .description("convert a llama2.c checkpoint and tokenizer.bin into a Hugging Face Llama folder")
  .argument("<model.bin>", "llama2.c checkpoint (legacy format)")
  .argument("<tokenizer.bin>", "llama2.c tokenizer")
  .argument("<out-folder>", "folder to write config.json, model.safetensors, tokenizer.json into")
  .action((modelFile: string, tokFile: string, outDir: string) => {
    const cfg = convertLlama2c(modelFile, tokFile, outDir);
    console.log(
      `wrote ${outDir}: ${cfg.numLayers} layers, hidden ${cfg.hiddenSize}, heads ${cfg.numHeads}/${cfg.numKvHeads}, vocab ${cfg.vocabSize}`,
    );
  });

/** An integer flag's parser: the settings table's, named by the flag. */
const int = integerText;
const float = (name: string, ok: (x: number) => boolean, what: string) => (v: string) => {
  const n = Number(v);
  if (v.trim() === "" || !Number.isFinite(n) || !ok(n)) throw new UsageError(`${name} must be ${what}, got "${v}"`);
  return n;
};

const ALL_SETTINGS = Object.keys(RUN_SETTINGS) as Array<keyof RunSettings>;

/** The options of run settings `keys`, from their table (RUN_SETTINGS): the CLI only parses. */
function settingOptions(keys = ALL_SETTINGS): Option[] {
  return keys
    .map((k) => RUN_SETTINGS[k] as SettingSpec<unknown>)
    .map((spec) => {
      const o = new Option(spec.flag, spec.help);
      if (spec.choices) o.choices([...spec.choices]);
      if (spec.parse) o.argParser(spec.parse as (text: string) => unknown);
      // a flag that takes a value shows its default (booleans and "none" defaults are off when not given)
      if (spec.flag.includes("<") && spec.default !== null && !spec.unsetOnCli)
        o.default(spec.default, spec.shown ?? String(spec.default));
      return o;
    });
}

/** The run settings the options give (an option not given leaves its setting to the default). */
function settingsFromOptions(o: Record<string, unknown>, keys = ALL_SETTINGS): Partial<RunSettings> {
  const entries = keys.map((key) => {
    const spec = RUN_SETTINGS[key] as SettingSpec<unknown>;
    const value = o[new Option(spec.flag).attributeName()];
    return [key, spec.fromCli ? spec.fromCli(value) : value];
  });
  return Object.fromEntries(entries) as Partial<RunSettings>;
}

const runCommand = program
  .command("run")
  .description(
    "the causal-probe analysis: margins, layer patching with controls, LASSO, probes, low-rank PCA, logit lens",
  )
  .requiredOption("--base <dir>", "base model (Hugging Face Llama folder, or a Hub id org/name[@rev])")
  .requiredOption("--tuned <dir>", "preference-tuned model with the same architecture and vocabulary")
  .addOption(revisionOption())
  .requiredOption(
    "--pairs <file>",
    "JSONL(.gz): {prompt,chosen,rejected}, HH-RLHF {chosen,rejected}, or {prompt_ids,chosen_ids,rejected_ids}; with --format chat also TRL's lists of {role,content} messages",
  )
  .requiredOption("--out <dir>", "output folder for results.json, report.html, pairs.jsonl, activations.safetensors")
  .option("--limit <n>", "use the first n usable pairs", int("--limit", 1))
  .option("--max-tokens <n>", "skip (and count) pairs longer than n tokens", int("--max-tokens", 2))
  .option("--skip-bad", "count and skip malformed lines instead of stopping")
  .option("--resume", "continue the run in --out where it stopped (its inputs and settings must match)")
  .option("--force", "replace a run already in --out")
  .option(
    "--shard <i/n>",
    "score only the i-th of n parts of the pairs (0 ≤ i < n); combine the parts with prefprobe merge",
  )
  .addOption(backendOption())
  .addOption(budgetOption("both models together", WASM_PAIR_BUDGET / 2 ** 30))
  .option(
    "--workers <n>",
    "worker threads for scoring, each with its own backend and models (default: one per core on wasm/cpu, on wasm as many as memory holds at 4.25 GiB each; 1 for a run of a few seconds, where starting them costs what they save)",
    int("--workers", 1),
  )
  .action(async (o: Record<string, unknown>) => {
    const settings = settingsFromOptions(o);
    await localInputs(o, ["base", "tuned"], ["pairs"]);
    const shard = o.shard === undefined ? undefined : parseShard(String(o.shard));
    const done = await withProgress((events) =>
      runStudy(
        {
          base: String(o.base),
          tuned: String(o.tuned),
          pairs: String(o.pairs),
          out: String(o.out),
          limit: o.limit as number | undefined,
          maxTokens: o.maxTokens as number | undefined,
          skipBad: !!o.skipBad,
          backend: o.backend as string | undefined,
          resume: !!o.resume,
          force: !!o.force,
          shard,
          memoryBudget: o.memoryBudget as number | undefined,
          workers: o.workers as number | undefined,
        },
        settings,
        events,
      ),
    );
    if (done.pairs.resumed)
      console.log(
        `resumed: ${done.pairs.resumed} pairs from the earlier run, ${done.pairs.done - done.pairs.resumed} scored now`,
      );
    if (!done.results) {
      console.log(
        `shard ${shard!.index}/${shard!.count}: ${done.pairs.done} pairs scored into ${done.out}; when every shard is done: prefprobe merge OUT SHARD_DIR…`,
      );
      return;
    }
    printResults(done);
  });
for (const option of settingOptions()) runCommand.addOption(option);

program
  .command("merge")
  .description("combine the shard folders of one run (prefprobe run --shard i/n) into one complete run")
  .argument("<out>", "folder for the merged run")
  .argument("<shards...>", "the shard folders, one per shard")
  .option("--force", "replace a run already in <out>")
  .addOption(backendOption())
  .action(async (out: string, shards: string[], o: { force?: boolean; backend?: string }) => {
    printResults(
      await withProgress((events) => mergeShards(out, shards, { ...events, force: !!o.force, backend: o.backend })),
    );
  });

/**
 * Runs a study with a progress bar on a terminal (stage lines otherwise) and Ctrl-C stopping between batches.
 * SIGTERM (what Slurm and Kubernetes send) stops the same way; a second signal of either kind stops at once.
 */
async function withProgress<T>(work: (events: StudyEvents) => Promise<T>): Promise<T> {
  const bar = new cliProgress.SingleBar(
    { format: "{stage} [{bar}] {value}/{total} | ETA {eta_formatted}", hideCursor: true, clearOnComplete: false },
    cliProgress.Presets.shades_classic,
  );
  const tty = process.stderr.isTTY;
  let started = false;
  let stop = false;
  const onSignal = () => {
    if (stop) process.exit(130); // a second signal: stop now (the pairs already scored are on disk)
    stop = true;
    process.stderr.write("\nstopping after the current batch… (Ctrl-C again to stop now)\n");
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  try {
    return await work({
      onInfo: (line) => process.stderr.write(line + "\n"),
      onStage: (stage, total) => {
        if (!tty) return void process.stderr.write(`${stage} (${total})…\n`);
        if (started) bar.stop();
        bar.start(total, 0, { stage: stage.padEnd(24) });
        started = true;
      },
      onProgress: (d) => tty && bar.update(d),
      shouldStop: () => stop,
    });
  } finally {
    if (started) bar.stop();
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
  }
}

function printResults(done: StudyResult): void {
  console.log(summaryTable(done.results!));
  console.log("\nFindings:");
  for (const w of done.findings) console.log(`  - ${w}`);
  console.log(`\nreport: ${path.join(done.out, "report.html")}`);
  console.log(`results: ${path.join(done.out, "results.json")}`);
}

/** The run settings apply-subspace takes. */
const TRANSFER_SETTINGS: Array<keyof RunSettings> = ["positions", "alpha", "perToken", "batchPairs", "seed", "format"];

const transferCommand = program
  .command("apply-subspace")
  .description(
    "carry a run's saved subspace (subspace.safetensors) to other pairs or another model pair of the same width: how much of the layer's effect it recovers there, and steering with its mean difference",
  )
  .requiredOption("--subspace <file>", "subspace.safetensors from a run's output folder")
  .requiredOption("--base <dir>", "base model")
  .addOption(revisionOption())
  .requiredOption("--tuned <dir>", "tuned model (same width as the run that saved the subspace)")
  .requiredOption("--pairs <file>", "pairs (same formats as run)")
  .requiredOption("--out <file>", "JSON file for the result")
  .option("--limit <n>", "use the first n usable pairs", int("--limit", 1))
  .option("--max-tokens <n>", "skip (and count) pairs longer than n tokens", int("--max-tokens", 2))
  .option("--force", "replace --out if it exists")
  .addOption(backendOption())
  .addOption(budgetOption("both models together", WASM_PAIR_BUDGET / 2 ** 30))
  .action(async (o: Record<string, unknown>) => {
    await localInputs(o, ["base", "tuned"], ["pairs"]);
    const r = await withProgress((events) =>
      runTransfer(
        {
          subspace: String(o.subspace),
          base: String(o.base),
          tuned: String(o.tuned),
          pairs: String(o.pairs),
          out: String(o.out),
          limit: o.limit as number | undefined,
          maxTokens: o.maxTokens as number | undefined,
          backend: o.backend as string | undefined,
          memoryBudget: o.memoryBudget as number | undefined,
          force: !!o.force,
        },
        settingsFromOptions(o, TRANSFER_SETTINGS),
        events,
      ),
    );
    console.log("Findings:");
    for (const w of transferFindings(r)) console.log(`  - ${w}`);
    console.log(`\nresult: ${String(o.out)}`);
  });
for (const option of settingOptions(TRANSFER_SETTINGS)) transferCommand.addOption(option);

program
  .command("tune")
  .description(
    "DPO-tune a model on preference pairs (reference = the starting model) and save an HF folder; exactly what runs: docs/tune.md",
  )
  .requiredOption("--model <dir>", "starting model (Hugging Face Llama folder or Hub id); also the DPO reference")
  .addOption(revisionOption())
  .requiredOption("--pairs <file>", "training pairs (same formats as run)")
  .requiredOption("--out <dir>", "folder to write the tuned model into (must not exist, or use --force)")
  .option(
    "--beta <b>",
    "DPO β",
    float("--beta", (x) => x > 0, "positive"),
    DEFAULT_TUNE.beta,
  )
  .option(
    "--lr <lr>",
    "Adam learning rate (constant unless --warmup or --schedule say otherwise)",
    float("--lr", (x) => x > 0, "positive"),
    DEFAULT_TUNE.lr,
  )
  .option("--epochs <n>", "passes over the pairs", int("--epochs", 1), DEFAULT_TUNE.epochs)
  .option("--batch <n>", "pairs per step", int("--batch", 1), DEFAULT_TUNE.batchPairs)
  .option(
    "--train <patterns>",
    "comma-separated weight name patterns, each of which must select a weight: a pattern with *, ? or [..] is a glob matched against the whole name (model.layers.*.mlp.down_proj.weight); any other selects every weight whose name contains it (norm, layers.2.mlp)",
    "*",
  )
  .option(
    "--rank <r>",
    "train a rank-r update (α/r)·A·B of each selected matrix (merged on save; 1-D weights are still updated in full); r at most the matrix's smaller side",
    int("--rank", 1),
  )
  .option(
    "--lora-alpha <a>",
    "the α of the low-rank update's scale α/r (default: r, a scale of 1)",
    float("--lora-alpha", (x) => x > 0, "positive"),
  )
  .option(
    "--adam-beta1 <b>",
    "Adam β1",
    float("--adam-beta1", (x) => x >= 0 && x < 1, "in [0, 1)"),
    DEFAULT_TUNE.adamBeta1,
  )
  .option(
    "--adam-beta2 <b>",
    "Adam β2",
    float("--adam-beta2", (x) => x >= 0 && x < 1, "in [0, 1)"),
    DEFAULT_TUNE.adamBeta2,
  )
  .option(
    "--adam-eps <e>",
    "Adam ε, added to √v̂ (PyTorch's default is 1e-8)",
    float("--adam-eps", (x) => x > 0, "positive"),
    DEFAULT_TUNE.adamEpsilon,
  )
  .option(
    "--warmup <steps>",
    "ramp the learning rate linearly from 0 over the first steps",
    int("--warmup", 0),
    DEFAULT_TUNE.warmupSteps,
  )
  .addOption(
    new Option("--schedule <s>", "learning rate after the warm-up")
      .choices([...SCHEDULES])
      .default(DEFAULT_TUNE.schedule),
  )
  .option("--seed <s>", "random seed (shuffling, low-rank init)", int("--seed", 0), DEFAULT_TUNE.seed)
  .option("--eval <file>", "held-out pairs: report margins and reward accuracy before and after")
  .option("--limit <n>", "use the first n pairs", int("--limit", 1))
  .option("--max-tokens <n>", "skip pairs longer than n tokens", int("--max-tokens", 2))
  .option("--force", "replace --out if it exists")
  .addOption(settingOptions(["format"])[0]!)
  .addOption(backendOption())
  .action(async (o: Record<string, unknown>) => {
    await localInputs(o, ["model"], ["pairs", "eval"]);
    const settings: TuneSettings = {
      beta: o.beta as number,
      lr: o.lr as number,
      epochs: o.epochs as number,
      batchPairs: o.batch as number,
      train: String(o.train)
        .split(",")
        .map((x) => x.trim())
        .filter(Boolean),
      rank: (o.rank as number | undefined) ?? null,
      loraAlpha: (o.loraAlpha as number | undefined) ?? null,
      seed: o.seed as number,
      adamBeta1: o.adamBeta1 as number,
      adamBeta2: o.adamBeta2 as number,
      adamEpsilon: o.adamEps as number,
      warmupSteps: o.warmup as number,
      schedule: o.schedule as Schedule,
    };
    if (settings.loraAlpha !== null && settings.rank === null)
      throw new UsageError("--lora-alpha scales a low-rank update: give --rank too");
    const bar = new cliProgress.SingleBar(
      {
        format:
          "DPO [{bar}] {value}/{total} | loss {loss} | reward acc {acc} | reward margin {margin} | ETA {eta_formatted}",
        hideCursor: true,
      },
      cliProgress.Presets.shades_classic,
    );
    const tty = process.stderr.isTTY;
    let started = false;
    const out = String(o.out);
    const res = await runTune(
      {
        model: String(o.model),
        pairs: String(o.pairs),
        out,
        eval: o.eval as string | undefined,
        limit: o.limit as number | undefined,
        maxTokens: o.maxTokens as number | undefined,
        force: !!o.force,
        backend: o.backend as string | undefined,
        command: `prefprobe ${process.argv.slice(2).join(" ")}`,
        format: o.format as PairFormat,
      },
      settings,
      {
        onInfo: (line) => process.stderr.write(line + "\n"),
        onStep: (m, total) => {
          const vals = { loss: m.loss.toFixed(4), acc: accuracy(m.rewardAccuracy), margin: m.rewardMargin.toFixed(3) };
          if (tty) {
            if (!started) bar.start(total, 0, vals);
            started = true;
            bar.update(m.step, vals);
          } else if (m.step === total || m.step % 10 === 0)
            process.stderr.write(
              `step ${m.step}/${total} loss ${vals.loss} reward acc ${vals.acc} reward margin ${vals.margin}\n`,
            );
        },
      },
    ).finally(() => started && bar.stop());
    const { last, evaluation } = res;
    console.log(
      `trained ${res.trained.length} weight${res.trained.length === 1 ? "" : "s"}${res.rank ? ` (rank-${res.rank} updates)` : ""} for ${res.steps} steps in ${(res.trainMs / 1000).toFixed(1)} s`,
    );
    console.log(
      `last step: loss ${last.loss.toFixed(4)}, reward accuracy ${accuracy(last.rewardAccuracy)}${last.atNoiseFloor ? ` (${last.atNoiseFloor} of the batch's pairs within float32 noise, not counted)` : ""}, reward margin ${last.rewardMargin.toFixed(3)}`,
    );
    if (evaluation) {
      const acc =
        evaluation.rewardAccuracy === null
          ? "reward accuracy undefined (no margin moved beyond float32 noise)"
          : `reward accuracy ${(100 * evaluation.rewardAccuracy).toFixed(1)}%${evaluation.atNoiseFloor ? ` (${evaluation.atNoiseFloor} pairs within float32 noise, not counted)` : ""}`;
      console.log(
        `held-out (${evaluation.pairs} pairs): mean margin ${evaluation.meanMarginBase.toFixed(3)} → ${evaluation.meanMarginTuned.toFixed(3)}; ${acc}; prefers chosen ${(100 * evaluation.basePrefersChosen).toFixed(1)}% → ${(100 * evaluation.tunedPrefersChosen).toFixed(1)}%`,
      );
    }
    console.log(`wrote ${out}`);
  });

function checkWritable(file: string): void {
  const dir = path.dirname(path.resolve(file));
  if (!fs.existsSync(dir)) throw new UsageError(`cannot write ${file}: folder ${dir} does not exist`);
  if (!fs.statSync(dir).isDirectory()) throw new UsageError(`cannot write ${file}: ${dir} is not a folder`);
  if (fs.existsSync(file) && fs.statSync(file).isDirectory())
    throw new UsageError(`cannot write ${file}: it is a folder`);
}

/**
 * A reader that went away (`prefprobe run … | head`) makes writes to stdout or stderr fail with EPIPE; that
 * stream is then left alone, and the command runs on to write its outputs.
 */
function survivePipeClose(): void {
  for (const stream of [process.stdout, process.stderr])
    stream.on("error", (e: NodeJS.ErrnoException) => {
      if (e.code !== "EPIPE" && e.code !== "ERR_STREAM_DESTROYED") throw e;
      stream.write = (() => true) as typeof stream.write;
    });
}

async function main(): Promise<void> {
  survivePipeClose();
  try {
    await program.parseAsync(process.argv);
  } catch (e) {
    if (e instanceof CommanderError) {
      // --help and --version exit 0 after printing; a usage error is one line
      if (e.exitCode === 0) return;
      console.error(`prefprobe: ${e.message.replace(/^error: /, "error: ").split("\n")[0]}`);
      process.exitCode = 1;
      return;
    }
    if (e instanceof Interrupted) {
      console.error(`interrupted after ${e.done} of ${e.total} pairs; rerun with --resume`);
      process.exitCode = 130;
      return;
    }
    const err = explainBackendError(e) as Error;
    if (program.opts().debug || process.env.PREFPROBE_DEBUG) console.error(err.stack ?? String(err));
    else console.error(`prefprobe: error: ${withFlags(err.message.split("\n")[0]!)}`);
    process.exitCode = 1;
  }
}

await main();
