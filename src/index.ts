// prefprobe's public surface: `import { ... } from "prefprobe"`, each name listed with a line in docs/api.md
// (a test keeps the two equal). Re-exports, and one side effect: tensors get tfjs's chained ops.
/// <reference types="long" preserve="true" />
// tfjs-core is re-exported as `tf`: use it (not a second copy of @tensorflow/tfjs-core) for tensors you hand in.
import { createRequire } from "node:module";

// Chained ops (`v.mul(mask)`, `x.sum(-1)` in a hook), which tfjs-core alone leaves out: tfjs-core's own
// register_all_chained_ops is an ES module whose imports lack file extensions, so Node cannot load it; the
// @tensorflow/tfjs bundle registers the same ops on the shared Tensor class. Their types are tfjs-core's (the
// type-only export below); the bundle is required, not imported, so that the declarations do not pull in
// tfjs-layers' types, which fail under --strict.
createRequire(import.meta.url)("@tensorflow/tfjs");
export type {} from "@tensorflow/tfjs-core/dist/public/chained_ops/register_all_chained_ops.js";

export * as tf from "@tensorflow/tfjs-core";

// Backends
export {
  initBackend,
  backendKind,
  BACKENDS,
  BackendError,
  type BackendName,
  type BackendOptions,
} from "./model/backend.js";
export { nativeStatus } from "./model/native.js";

// Models: configs, loading, saving
export { parseConfig, ConfigError, type LlamaConfig } from "./model/config.js";
export { loadConfig } from "./io/config.js";
export { loadModel, loadModelSync, saveModelFolder, ModelError, type LoadOptions } from "./io/model.js";
export { disposeModel, type LlamaModel } from "./model/llama.js";
export { loadTokenizer, TokenizerError, type TextTokenizer } from "./io/tokenizer.js";
export { convertLlama2c } from "./io/llama2c.js";
export {
  resolveModel,
  resolveHubFile,
  hubCacheDir,
  hubToken,
  hubSourceOf,
  parseHubId,
  parseHfUrl,
  HubError,
  type HubOptions,
  type HubSource,
  type DownloadProgress,
} from "./io/hub.js";

// Forward pass, hooks and caches
export {
  forward,
  type ForwardOptions,
  type ForwardResult,
  type Hook,
  type Hooks,
  type HeadBlock,
} from "./model/llama.js";
export {
  ActivationCache,
  BLOCK_SITES,
  INNER_SITES,
  hookName,
  hookNames,
  isHookName,
  type BlockSite,
  type HookName,
  type InnerSite,
  type LayerSite,
} from "./model/hooks.js";
export { greedy, type GenerateOptions } from "./model/generate.js";

// Preference pairs, batches and margins
export type { Pair } from "./data/pairs.js";
export { makeBatch, marginsOf, responseLogprobs, rowLogprobs, type PairBatch } from "./data/batch.js";
export { loadPairs, readPairs, splitHH, tokenizePairs, PairsError, type RawPair } from "./io/pairs.js";
export {
  compileChatTemplate,
  conversationOf,
  hhMessages,
  loadChatTemplate,
  renderChatPair,
  sharedChatTemplate,
  ChatTemplateError,
  type ChatMessage,
  type ChatPair,
  type ChatTemplate,
} from "./io/chat.js";

// The intervention engine: margins of named patched runs, and of plain ones
export { runMargins, type Run, type RunOptions, type Strategy } from "./engine/runs.js";
export { residAfter, responseLogprobsOf, type MarginOptions } from "./engine/margins.js";
export { margins } from "./io/margins.js";
export { DEFAULT_LIMITS, type Limits } from "./engine/limits.js";
export {
  logitDiff,
  pairMargin,
  patch,
  patchSweep,
  tokenLogprob,
  type Metric,
  type MetricInput,
  type PatchResult,
  type PatchSite,
  type PatchSource,
  type PatchSpec,
  type Position,
  type SweepSite,
  type SweepSpec,
  type SweepTable,
  type Tokens,
} from "./engine/patch.js";

// The analysis: settings, the whole run, its results, and each stage
export {
  DEFAULT_SETTINGS,
  DIRECTIONS,
  METHODS,
  PAIR_FORMATS,
  SITES,
  SettingsError,
  resolveSettings,
  type Direction,
  type Method,
  type PairFormat,
  type RunSettings,
  type Site,
} from "./analysis/settings.js";
export {
  Interrupted,
  type AttributionSummary,
  type GainSummary,
  type LassoResult,
  type LowRankResult,
  type PairRecord,
  type PatchingEntry,
  type ProbeResult,
  type Results,
  type RunCallbacks,
} from "./analysis/schema.js";
export { analysePairs, finishAnalysis, runAnalysis } from "./analysis/run.js";
export { makePlan, scoreBatch, type ModelPair, type Plan, type ScoredBatch } from "./analysis/scoring.js";
export { interpolate, meanAblation, randomDirection, subspace, type Patch } from "./analysis/patches.js";
export { sweepBatch, sweepInput, type SweepInput } from "./analysis/sweep.js";
export { attributionBatch } from "./analysis/attribution.js";
export { headSweep, positionSweep } from "./analysis/fine.js";
export { logitLensBatch } from "./analysis/lens.js";
export { lowRankStage } from "./analysis/lowrank.js";
export { steeringHooks, transferStage, type SavedSubspace, type TransferResult } from "./analysis/steering.js";
export { findings, summaryTable } from "./analysis/findings.js";

// Estimators and statistics
export { lassoCV, type LassoCVResult } from "./stats/lasso.js";
export { logisticFit, probeCV } from "./stats/logistic.js";
export { pcaOfDifferences, type PcaResult } from "./stats/pca.js";
export { bootstrapRatioCI, pearson, seededRandom } from "./stats/stats.js";

// DPO
export { enableGradients } from "./model/gradients.js";
export {
  DEFAULT_TUNE,
  evaluatePairs,
  selectWeights,
  tuneDPO,
  TuneError,
  type StepMetrics,
  type TuneSettings,
} from "./train/dpo.js";

// Files and whole studies (what the CLI's run, merge, transfer and tune do)
export { readSafetensors, writeSafetensors, SafetensorsError, type DType } from "./io/safetensors.js";
export { readResults, readSubspace, writeRun, OutputError, type ResultsFile } from "./io/results.js";
export { renderReport } from "./io/report.js";
export {
  mergeShards,
  runStudy,
  runTransfer,
  runTune,
  type StudyEvents,
  type StudyInputs,
  type StudyResult,
  type TransferInputs,
  type TuneInputs,
  type TuneResult,
} from "./study.js";
