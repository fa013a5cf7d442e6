// The library names settings as its options do (memoryBudget, batchPairs); the CLI reports them by their flags.

/** Library setting names (RunSettings, TuneSettings, LoadOptions) and the flags that set them. */
const FLAGS: Record<string, string> = {
  memoryBudget: "--memory-budget",
  batchPairs: "--batch",
  maxTokens: "--max-tokens",
  pcaLayer: "--pca-layer",
  pcaTestFrac: "--pca-test-frac",
  stabilityReps: "--stability",
  positionMap: "--position-map",
  perToken: "--per-token",
  loraAlpha: "--lora-alpha",
  adamBeta1: "--adam-beta1",
  adamBeta2: "--adam-beta2",
  adamEpsilon: "--adam-eps",
  warmupSteps: "--warmup",
};
/** Settings of one plain word, named by the flag only where a message starts with them ("rank 33 is more than …"). */
const LEADING = ["alpha", "method", "positions", "window", "seed", "folds", "bootstrap", "train", "rank", "subspace"];

/** A library message in the CLI's words: each setting it names becomes the flag that sets it. */
export function withFlags(message: string): string {
  let m = message.replace(new RegExp(`\\b(${Object.keys(FLAGS).join("|")})\\b`, "g"), (k) => FLAGS[k]!);
  const lead = new RegExp(`^(${LEADING.join("|")})\\b`).exec(m);
  if (lead) m = `--${m}`;
  return m;
}
