// prefprobe's public surface: `import { ... } from "prefprobe"`. Re-exports only; importing it runs nothing.
/// <reference types="long" preserve="true" />
// tfjs-core is re-exported as `tf`: use it (not a second copy of @tensorflow/tfjs-core) for tensors you hand in.

export * as tf from "@tensorflow/tfjs-core";

// Backends, models and loading
export {
  initBackend,
  ensureBackend,
  explainBackendError,
  wasmHeapBytes,
  backendKind,
  BACKENDS,
  BACKEND_ENV,
  BackendError,
  type BackendName,
  type BackendOptions,
} from "./model/backend.js";
export { nativeStatus, StoredMatrix } from "./model/native.js";
export { parseConfig, configToJson, ConfigError, type LlamaConfig, type RopeScaling } from "./model/config.js";
export {
  disposeModel,
  forward,
  GROUPED_ATTENTION_MIN,
  HEAD_BLOCK,
  type ForwardOptions,
  type HeadBlock,
  type Hooks,
  type ForwardResult,
  type Hook,
  type LlamaLayer,
  type LlamaModel,
  type Matrix,
  type WeightSource,
} from "./model/llama.js";
export { readValues } from "./model/read.js";
export {
  namedWeights,
  weightRefs,
  withWeights,
  expectedTensors,
  weightBytes,
  type WeightRef,
} from "./model/weights.js";
export { loadConfig } from "./io/config.js";
export {
  backendCopies,
  loadModel,
  loadModelSync,
  residentBytes,
  saveModel,
  saveModelFolder,
  ModelError,
  WASM_WEIGHT_LIMIT,
  type LoadOptions,
} from "./io/model.js";
export { Residency, shareResidency, StoredWeights, StreamedWeights } from "./io/stream.js";
export { loadTokenizer, TokenizerError, type TextTokenizer } from "./io/tokenizer.js";

// Forward pass, hook names and caches
export {
  ActivationCache,
  BLOCK_SITES,
  hookName,
  hookNames,
  isHookName,
  type BlockSite,
  type HookName,
} from "./model/hooks.js";
export { logitsAndResid, residSites } from "./model/resid.js";
export { greedy } from "./model/generate.js";

// The intervention engine: margins of named patched runs, and of plain ones
export { runMargins, type Run, type RunOptions, type Strategy } from "./engine/runs.js";
export { margins, marginsOfRun, residAfter, scored, type MarginOptions } from "./engine/margins.js";
export {
  DEFAULT_LIMITS,
  headGroup,
  layerActivationBytes,
  scoringBytes,
  stackGroup,
  type Limits,
} from "./engine/limits.js";

// Preference pairs and batches
export type { Pair } from "./data/pairs.js";
export {
  makeBatch,
  marginsOf,
  pairedInput,
  positionMask,
  responseLogprobs,
  rowLogprobs,
  tokenLogprobs,
  type PairBatch,
} from "./data/batch.js";
export {
  iterPairs,
  loadPairs,
  readPairs,
  readUsablePairs,
  splitHH,
  tokenizePairs,
  tokenizeTextPair,
  PairsError,
  type RawPair,
  type TokenizedPairs,
} from "./io/pairs.js";

// The analysis: settings and results, the whole run, and each stage
export {
  DEFAULT_SETTINGS,
  DIRECTIONS,
  METHODS,
  SITES,
  runsAttribution,
  runsControls,
  runsExact,
  SettingsError,
  resolveSettings,
  type Direction,
  type Method,
  type RunSettings,
  type Site,
} from "./analysis/settings.js";
export {
  type GainSummary,
  type LassoResult,
  type LowRankResult,
  type PairAttribution,
  Interrupted,
  type PairRecord,
  type PairState,
  type PatchingEntry,
  type ProbeResult,
  type Results,
  type RunCallbacks,
  type StageTimes,
  addTimes,
} from "./analysis/schema.js";
export {
  analyseBatch,
  analysePairs,
  BatchTooLarge,
  finishAnalysis,
  layoutOf,
  planBatches,
  runAnalysis,
} from "./analysis/run.js";
export {
  batchBytes,
  checkCompatible,
  comboKey,
  makePlan,
  pairRecord,
  scoreBatch,
  type Combo,
  type ModelPair,
  type Plan,
  type ScoredBatch,
} from "./analysis/scoring.js";
export {
  gainOf,
  interpolate,
  meanAblation,
  randomDirection,
  roles,
  sitesNeeded,
  subspace,
  windowLayers,
  type Patch,
} from "./analysis/patches.js";
export { comboRun, sweepBatch, sweepInput, type SweepInput } from "./analysis/sweep.js";
export { attributionBatch, attributionSummary, siteGradients } from "./analysis/attribution.js";
export { type AttributionEntry, type AttributionSummary } from "./analysis/schema.js";
export { PURPOSE, keyedNoise, meanAblationStage, randomDirectionPatch } from "./analysis/controls.js";
export { headSweep, positionSweep } from "./analysis/fine.js";
export {
  layerEditGains,
  steer,
  steeringVectors,
  STEERING_STRENGTHS,
  transferStage,
  type LayerEdit,
  type SavedSubspace,
  type TransferResult,
} from "./analysis/steering.js";
export { distancesOf } from "./analysis/distances.js";
export { meanOver, pairSums, positionsOf, sumsLayout, type SumsLayout } from "./analysis/sums.js";
export { logitLensBatch } from "./analysis/lens.js";
export { lassoStage, probeStage } from "./analysis/estimators.js";
export { choosePcaLayer, lowRankKs, lowRankSplit, lowRankStage } from "./analysis/lowrank.js";
export { gapTooSmall, patchingEntries, summarizeGains } from "./analysis/recovery.js";
export { findings, summaryTable, transferFindings } from "./analysis/findings.js";

// Estimators and statistics
export { lassoCV, lassoFit, lassoPath, type LassoCVResult, type LassoFit } from "./stats/lasso.js";
export { logisticFit, probeCV, type LogisticFit } from "./stats/logistic.js";
export { pcaOfDifferences, randomSubspace, symmetricEigen, type PcaResult } from "./stats/pca.js";
export { bootstrapRatioCI, kFolds, mean, pearson, permutation, seededRandom, tfSeed } from "./stats/stats.js";

// DPO
export { enableGradients } from "./model/gradients.js";
export {
  DEFAULT_TUNE,
  evaluatePairs,
  learningRate,
  noiseFloor,
  SCHEDULES,
  selectWeights,
  tuneDPO,
  TuneError,
  type Schedule,
  type StepMetrics,
  type TuneSettings,
} from "./train/dpo.js";

// Files: safetensors, run outputs, the report, and whole studies (what the CLI's run and tune do)
export {
  readSafetensors,
  writeSafetensors,
  SafetensorsError,
  type DType,
  type StoredTensor,
  type TensorToWrite,
} from "./io/safetensors.js";
export {
  activationTensors,
  modelFingerprint,
  readSubspace,
  resultsJson,
  subspaceTensors,
  writeRun,
  writeRunOutputs,
  OutputError,
  type RunMeta,
} from "./io/results.js";
export {
  clearRun,
  ensureWritableDir,
  fileHash,
  holdsRun,
  manifestDiff,
  readManifest,
  readStates,
  RunFolderError,
  RunLog,
  writeManifest,
  type Manifest,
} from "./io/runfolder.js";
export { renderReport } from "./io/report.js";
export { convertLlama2c } from "./io/llama2c.js";
export {
  batchBudget,
  mergeShards,
  runTransfer,
  WASM_PAIR_BUDGET,
  WASM_SCRATCH,
  type TransferInputs,
  parseShard,
  runStudy,
  runTune,
  shardBatches,
  weightBudget,
  type StudyEvents,
  type StudyInputs,
  type StudyResult,
  type TuneInputs,
  type TuneResult,
} from "./study.js";
