// The library names settings as its options do (memoryBudget, batchPairs); the CLI reports them by their flags.
import { RUN_SETTINGS } from "./analysis/settings.js";

/** Library setting names and the flags that set them: every run setting (from its table), tune's and loading's. */
const FLAGS: Record<string, string> = {
  ...Object.fromEntries(
    Object.entries(RUN_SETTINGS)
      .filter(([, spec]) => !spec.flag.startsWith("--no-"))
      .map(([key, spec]) => [key, spec.flag.split(" ")[0]!]),
  ),
  memoryBudget: "--memory-budget",
  maxTokens: "--max-tokens",
  loraAlpha: "--lora-alpha",
  adamBeta1: "--adam-beta1",
  adamBeta2: "--adam-beta2",
  adamEpsilon: "--adam-eps",
  warmupSteps: "--warmup",
  train: "--train",
  rank: "--rank",
  subspace: "--subspace",
};

/**
 * A library message in the CLI's words: a camelCase setting name anywhere becomes its flag; a one-word name (alpha,
 * rank, layers) only where the message starts with it as a word, as it is an ordinary word elsewhere. A name
 * inside a dotted path (a manifest's "settings.stabilityReps", a file "subspace.safetensors") is left as it is.
 */
export function withFlags(message: string): string {
  // camelCase: a lower-case letter then a capital (a one-letter name such as C is a one-word name)
  const camel = Object.keys(FLAGS).filter((k) => /[a-z][A-Z]/.test(k));
  let m = message.replace(new RegExp(`(?<!\\w\\.|\\w)(${camel.join("|")})(?!\\.\\w|\\w)`, "g"), (k) => FLAGS[k]!);
  const lead = /^([a-zA-Z]+)(?=[ :,])/.exec(m)?.[1];
  if (lead && FLAGS[lead] && !camel.includes(lead)) m = FLAGS[lead] + m.slice(lead.length);
  return m;
}
