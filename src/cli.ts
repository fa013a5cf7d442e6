#!/usr/bin/env node
// prefprobe command line: parses arguments and calls the library. Errors print as one line (stack with --debug).
import * as fs from "node:fs";
import * as path from "node:path";
import { Command, Option } from "commander";
import * as tf from "@tensorflow/tfjs-core";
import { initBackend, BACKENDS } from "./model/backend.js";
import { loadModel } from "./io/model.js";
import { loadTokenizer, type TextTokenizer } from "./io/tokenizer.js";
import { writeSafetensors } from "./io/safetensors.js";
import { convertLlama2c } from "./io/llama2c.js";
import { logitsAndResid } from "./model/resid.js";
import { greedy } from "./model/generate.js";
import { disposeModel } from "./model/llama.js";

/** An error in what the user asked for, reported without a stack trace. */
export class UsageError extends Error {
  override name = "UsageError";
}

const program = new Command();
program
  .name("prefprobe")
  .description("Causal probes of preference tuning on a hand-written Llama forward pass (TensorFlow.js)")
  .option("--debug", "print stack traces on errors")
  .showHelpAfterError();

const backendOption = () => new Option("--backend <name>", "tfjs backend (default: best installed)").choices([...BACKENDS]);

async function startBackend(force?: string): Promise<string> {
  const name = await initBackend(force);
  process.stderr.write(`backend: ${name}\n`);
  return name;
}

function parseIds(s: string, vocab: number): number[] {
  const ids = s.split(",").map((x) => x.trim());
  if (ids.length === 0 || ids.some((x) => !/^\d+$/.test(x))) throw new UsageError(`--ids must be comma-separated non-negative integers, got "${s}"`);
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
  .requiredOption("--model <dir>", "Hugging Face Llama folder (config.json + safetensors)")
  .option("--text <text>", "text to tokenize (the tokenizer's settings decide BOS)")
  .option("--ids <ids>", "comma-separated token ids, used as-is (no BOS added)")
  .option("--out <file>", "write logits F32 [T, V] (and resid) to this safetensors file")
  .option("--resid", "also write resid F32 [L+1, T, H]: embedding output, then after each block")
  .option("--top <k>", "how many next tokens to show", "5")
  .addOption(backendOption())
  .action(async (o: { model: string; text?: string; ids?: string; out?: string; resid?: boolean; top: string; backend?: string }) => {
    if ((o.text === undefined) === (o.ids === undefined)) throw new UsageError("give exactly one of --text or --ids");
    if (o.resid && !o.out) throw new UsageError("--resid needs --out");
    const top = Number(o.top);
    if (!Number.isInteger(top) || top < 1) throw new UsageError(`--top must be a positive integer, got "${o.top}"`);
    if (o.out) checkWritable(o.out);
    await startBackend(o.backend);
    const model = loadModel(o.model);
    const tok = loadTokenizer(o.model);
    const ids = o.ids !== undefined ? parseIds(o.ids, model.config.vocabSize) : needTokenizer(tok, o.model).encode(o.text!);
    if (ids.length === 0) throw new UsageError("the input has no tokens");
    const { logits, resid } = logitsAndResid(model, ids, !!o.resid);
    const last = tf.tidy(() => tf.softmax(tf.slice(logits, [ids.length - 1, 0], [1, -1])).dataSync());
    const order = Array.from(last.keys()).sort((a, b) => last[b]! - last[a]!).slice(0, top);
    console.log(`tokens (${ids.length}): ${ids.join(" ")}`);
    console.log(`top ${order.length} next tokens after position ${ids.length - 1}:`);
    for (const id of order) console.log(`  ${(100 * last[id]!).toFixed(2).padStart(6)}%  ${String(id).padStart(6)}  ${show(tok, ids, id)}`);
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
  });

program
  .command("generate")
  .description("greedy decoding from text (or from BOS when --text is empty)")
  .requiredOption("--model <dir>", "Hugging Face Llama folder")
  .option("--text <text>", "prompt text", "")
  .option("--steps <n>", "tokens to generate", "50")
  .addOption(backendOption())
  .action(async (o: { model: string; text: string; steps: string; backend?: string }) => {
    const steps = Number(o.steps);
    if (!Number.isInteger(steps) || steps < 1) throw new UsageError(`--steps must be a positive integer, got "${o.steps}"`);
    await startBackend(o.backend);
    const model = loadModel(o.model);
    const tok = needTokenizer(loadTokenizer(o.model), o.model);
    const prompt = o.text === "" && tok.bosId !== null ? [tok.bosId] : tok.encode(o.text);
    const eos = model.config.eosTokenId;
    const out = greedy(model, prompt, steps, eos === null ? [] : Array.isArray(eos) ? eos : [eos]);
    console.log(tok.decode([...prompt, ...out], { skipSpecialTokens: true }));
    disposeModel(model);
  });

program
  .command("convert-llama2c")
  .description("convert a llama2.c checkpoint and tokenizer.bin into a Hugging Face Llama folder")
  .argument("<model.bin>", "llama2.c checkpoint (legacy format)")
  .argument("<tokenizer.bin>", "llama2.c tokenizer")
  .argument("<out-folder>", "folder to write config.json, model.safetensors, tokenizer.json into")
  .action((modelFile: string, tokFile: string, outDir: string) => {
    const cfg = convertLlama2c(modelFile, tokFile, outDir);
    console.log(`wrote ${outDir}: ${cfg.numLayers} layers, hidden ${cfg.hiddenSize}, heads ${cfg.numHeads}/${cfg.numKvHeads}, vocab ${cfg.vocabSize}`);
  });

function checkWritable(file: string): void {
  const dir = path.dirname(path.resolve(file));
  if (!fs.existsSync(dir)) throw new UsageError(`cannot write ${file}: folder ${dir} does not exist`);
}

async function main(): Promise<void> {
  try {
    await program.parseAsync(process.argv);
  } catch (e) {
    const err = e as Error;
    if (program.opts().debug || process.env.PREFPROBE_DEBUG) console.error(err.stack ?? String(err));
    else console.error(`prefprobe: error: ${err.message.split("\n")[0]}`);
    process.exitCode = 1;
  }
}

await main();
