// Reading a computed tensor back into JavaScript.
import * as tf from "@tensorflow/tfjs-core";

/**
 * Runs `make` in a tidy scope and returns its result's values, freeing every tensor it made. (Returning a typed
 * array from tf.tidy itself makes tfjs walk every element looking for tensors: seconds for millions of values.)
 */
export function readValues(make: () => tf.Tensor): Float32Array {
  const t = tf.tidy(make);
  try {
    return t.dataSync() as Float32Array;
  } finally {
    t.dispose();
  }
}
