// A preference pair as the analysis sees it: token ids of a shared prompt and of two responses.

/** A pair ready to run: token ids of the prompt and of each response. */
export interface Pair {
  index: number; // position among the pairs that are run
  line: number;
  promptIds: number[];
  chosenIds: number[];
  rejectedIds: number[];
  prompt?: string;
  chosen?: string;
  rejected?: string;
}
