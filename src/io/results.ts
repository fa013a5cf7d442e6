// Writes a run's outputs: results.json, activations.safetensors, report.html (each atomically) and the
// streaming pairs.jsonl log; plus model fingerprints for provenance.
import * as crypto from "node:crypto";
import * as fs from "node:fs";
import * as path from "node:path";
import { fileURLToPath } from "node:url";
import type { RunSettings } from "../analysis/settings.js";
import type { LowRankResult, Results } from "../analysis/schema.js";
import type { SavedSubspace } from "../analysis/steering.js";
import { FINAL_FILES } from "./runfolder.js";
import type { Pair } from "../data/pairs.js";
import type { HubSource } from "./hub.js";
import { renderReport } from "./report.js";
import { readHeader, readSafetensors, writeSafetensors, type TensorToWrite } from "./safetensors.js";
import * as tf from "@tensorflow/tfjs-core";
import { writeFileAtomic } from "./model.js";

/** sha256 over a model folder's config.json and weight files (names and bytes), read in chunks. */
export function modelFingerprint(dir: string): string {
  const h = crypto.createHash("sha256");
  const files = fs
    .readdirSync(dir)
    .filter((f) => f === "config.json" || f.endsWith(".safetensors") || f === "model.safetensors.index.json")
    .sort();
  const buf = Buffer.alloc(1 << 20);
  for (const f of files) {
    h.update(f);
    const fd = fs.openSync(path.join(dir, f), "r");
    try {
      for (let n; (n = fs.readSync(fd, buf, 0, buf.length, null)) > 0;) h.update(buf.subarray(0, n));
    } finally {
      fs.closeSync(fd);
    }
  }
  return h.digest("hex");
}

/**
 * What results.json holds, as a type: the run's Results without the large float arrays (mean_diff, the PCA's
 * components and steering vector: those are in activations.safetensors), plus what the run records about itself
 * (RunMeta: settings, inputs, findings, …). JSON has no NaN: a number that was NaN (no gap, no CI) reads as null.
 */
export type ResultsFile = { schema: "prefprobe.results/1" } & RunMeta &
  Omit<Results, "mean_diff" | "pca"> & { pca: Omit<LowRankResult, "components" | "steering_vector"> | null };

/** results.json content: everything but the large float arrays, which go to activations.safetensors. */
export function resultsJson(r: Results, meta: RunMeta): ResultsFile {
  const { mean_diff: _md, pca, ...rest } = r;
  const pcaOut = pca ? (({ components: _c, steering_vector: _v, ...p }) => p)(pca) : null;
  return { schema: "prefprobe.results/1", ...meta, ...rest, pca: pcaOut };
}

/** Reads a run's results.json (a file, or the run folder holding it); a file that is not one is a one-line error. */
export function readResults(fileOrDir: string): ResultsFile {
  const file =
    fs.existsSync(fileOrDir) && fs.statSync(fileOrDir).isDirectory() ? path.join(fileOrDir, "results.json") : fileOrDir;
  let json: unknown;
  try {
    json = JSON.parse(fs.readFileSync(file, "utf8"));
  } catch (e) {
    const why = (e as NodeJS.ErrnoException).code === "ENOENT" ? "no such file" : "not valid JSON";
    throw new OutputError(`${file}: ${why} (a finished run writes results.json last)`);
  }
  const schema = (json as { schema?: unknown } | null)?.schema;
  if (schema !== "prefprobe.results/1")
    throw new OutputError(`${file}: not a prefprobe results file (schema ${JSON.stringify(schema ?? null)})`);
  return json as ResultsFile;
}

/** The activation summaries as tensors readable from Python (safetensors.numpy.load_file). */
export function activationTensors(r: Results): Record<string, TensorToWrite> {
  const n = r.n_pairs;
  const L = r.num_layers;
  const t: Record<string, TensorToWrite> = {
    distance: { dtype: "F32", shape: [n, L], data: r.pairs.flatMap((p) => p.distance) },
    cosine_distance: { dtype: "F32", shape: [n, L], data: r.pairs.flatMap((p) => p.cosine_distance) },
    margin_base: { dtype: "F64", shape: [n], data: r.pairs.map((p) => p.margin.base) },
    margin_tuned: { dtype: "F64", shape: [n], data: r.pairs.map((p) => p.margin.tuned) },
    mean_diff_resid_post: { dtype: "F32", shape: [L, r.hidden_size], data: r.mean_diff },
  };
  const groups = new Map<string, typeof r.patching>();
  for (const p of r.patching) {
    const k = `gains.${p.direction.replace("->", "_to_")}.${p.site}`;
    groups.set(k, [...(groups.get(k) ?? []), p]);
  }
  for (const [k, ps] of groups) t[k] = { dtype: "F64", shape: [ps.length, n], data: ps.flatMap((p) => p.gains) };
  if (r.pca) {
    const rank = r.pca.components.length / r.hidden_size;
    t.pca_components = { dtype: "F32", shape: [rank, r.hidden_size], data: r.pca.components };
    t.pca_explained_variance_ratio = {
      dtype: "F64",
      shape: [r.pca.explained_variance_ratio.length],
      data: r.pca.explained_variance_ratio,
    };
    t.pca_steering_vector = { dtype: "F32", shape: [r.hidden_size], data: r.pca.steering_vector };
  }
  return t;
}

/**
 * subspace.safetensors: the low-rank stage's principal directions (`components` [k, H], all the training rows
 * gave) and mean difference (`mean_diff` [H]) at its layer, for `prefprobe apply-subspace`; metadata says where
 * they came from. Null when the run had no low-rank stage.
 */
export function subspaceTensors(
  r: Results,
  source: Record<string, string>,
): { tensors: Record<string, TensorToWrite>; metadata: Record<string, string> } | null {
  if (!r.pca) return null;
  const H = r.hidden_size;
  return {
    tensors: {
      components: { dtype: "F32", shape: [r.pca.components.length / H, H], data: r.pca.components },
      mean_diff: { dtype: "F32", shape: [H], data: r.pca.steering_vector },
      explained_variance_ratio: {
        dtype: "F64",
        shape: [r.pca.explained_variance_ratio.length],
        data: r.pca.explained_variance_ratio,
      },
    },
    metadata: {
      producer: "prefprobe run",
      site: "resid_post",
      layer: String(r.pca.layer),
      hidden_size: String(H),
      k_90: String(r.pca.k_90),
      ...source,
    },
  };
}

/** Writes results.json, activations.safetensors, subspace.safetensors (when there is a low-rank stage) and report.html into outDir. */
export function writeRunOutputs(outDir: string, r: Results, meta: RunMeta, reportHtml: string): string[] {
  const finals = FINAL_FILES.map((f) => path.join(outDir, f));
  const temps = finals.map((f) => `${f}.final-${process.pid}`);
  const [acts, sub, report, results] = temps as [string, string, string, string];
  try {
    // everything is written under temporary names first, then renamed back to back (results.json last, so
    // its presence marks a finished run): the three files appear together or not at all
    writeSafetensors(acts, activationTensors(r), { producer: "prefprobe run", layers: String(r.num_layers) });
    const subspace = subspaceTensors(r, { ...meta.inputs });
    if (subspace) writeSafetensors(sub, subspace.tensors, subspace.metadata);
    writeFileAtomic(report, reportHtml);
    writeFileAtomic(results, JSON.stringify(resultsJson(r, meta), null, 1) + "\n");
    temps.forEach((t, i) => (fs.existsSync(t) ? fs.renameSync(t, finals[i]!) : fs.rmSync(finals[i]!, { force: true })));
  } finally {
    for (const t of temps) fs.rmSync(t, { force: true });
  }
  return finals;
}

/** What a run records about itself besides its results. */
export interface RunMeta {
  settings: RunSettings;
  inputs: { base: string; tuned: string; pairs: string }; // absolute paths
  hub?: Record<string, HubSource>; // inputs from a Hugging Face cache: repo and commit
  fingerprints: { base: string; tuned: string; pairs: string; tokenizer?: string }; // sha256 of the model folders, the pairs file and the tokenizer files
  skipped: { too_long: number; malformed: Array<{ line: number; reason: string }> };
  notes: { boundary_merged: number; identical_responses: number; invalid_utf8: number; same_models: boolean };
  backend: string;
  versions: Record<string, string>;
  findings: string[];
  total_ms: number;
}

/** Renders the report and writes every output of a run into outDir (results.json last). */
export async function writeRun(outDir: string, r: Results, meta: RunMeta, pairs: Pair[]): Promise<void> {
  const html = await renderReport(
    r,
    meta.findings,
    {
      base: `${meta.inputs.base} (sha256 ${meta.fingerprints.base.slice(0, 12)}…)`,
      tuned: `${meta.inputs.tuned} (sha256 ${meta.fingerprints.tuned.slice(0, 12)}…)`,
      pairs: `${meta.inputs.pairs}: ${r.n_pairs} used, ${meta.skipped.too_long} too long, ${meta.skipped.malformed.length} malformed`,
      settings: JSON.stringify(meta.settings),
      backend: meta.backend,
      versions: JSON.stringify(meta.versions),
    },
    pairs,
  );
  writeRunOutputs(outDir, r, meta, html);
}

/** Versions recorded with every output: prefprobe's (from its package.json), tfjs-core's, node's. */
export function versions(): Record<string, string> {
  let prefprobe = "unknown";
  // the nearest package.json above this file (src/io or dist/src/io) that is prefprobe's
  for (let dir = path.dirname(fileURLToPath(import.meta.url)); dir !== path.dirname(dir); dir = path.dirname(dir)) {
    try {
      const pkg = JSON.parse(fs.readFileSync(path.join(dir, "package.json"), "utf8"));
      if (pkg.name === "prefprobe") {
        prefprobe = pkg.version;
        break;
      }
    } catch {
      /* no package.json here: keep walking up */
    }
  }
  return { prefprobe, "tfjs-core": tf.version_core, node: process.version };
}

/** An output location that cannot be used. */
export class OutputError extends Error {
  override name = "OutputError";
}

/** Reads a subspace.safetensors written by `prefprobe run`; a file that is not one is a one-line error. */
export function readSubspace(file: string): SavedSubspace {
  if (!fs.existsSync(file)) throw new OutputError(`subspace ${file}: no such file`);
  const { metadata } = readHeader(file);
  const t = readSafetensors(file);
  const components = t.get("components");
  const meanDiff = t.get("mean_diff");
  const layer = Number(metadata.layer);
  if (!components || !meanDiff || metadata.site !== "resid_post" || !Number.isInteger(layer) || layer < 0) {
    throw new OutputError(
      `subspace ${file}: not a prefprobe subspace file (needs components, mean_diff and layer/site metadata)`,
    );
  }
  const H = meanDiff.shape[0]!;
  if (components.shape.length !== 2 || components.shape[1] !== H)
    throw new OutputError(`subspace ${file}: components [${components.shape}] do not match mean_diff [${H}]`);
  return { layer, components: components.data as Float32Array, meanDiff: meanDiff.data as Float32Array };
}
