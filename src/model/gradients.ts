// Gradients on tfjs-core: the registry is filled by @tensorflow/tfjs, loaded on first use.
import * as tf from "@tensorflow/tfjs-core";

let gradientsReady = false;

/**
 * Gradients need the gradient registry, which tfjs-core alone does not fill; @tensorflow/tfjs does. Its
 * gradient of gather uses UnsortedSegmentSum, which the wasm backend lacks, so gather's gradient (axis 0, the
 * only form the forward pass uses) is re-registered as a scatter-add, which every backend has.
 */
export async function enableGradients(): Promise<void> {
  if (gradientsReady) return;
  await import("@tensorflow/tfjs");
  tf.unregisterGradient(tf.GatherV2);
  tf.registerGradient({
    kernelName: tf.GatherV2,
    inputsToSave: ["x", "indices"],
    gradFunc: (dy, saved, attrs) => {
      const [x, indices] = saved as [tf.Tensor, tf.Tensor];
      const { axis, batchDims } = attrs as unknown as { axis: number; batchDims: number };
      if (axis !== 0 || batchDims !== 0)
        throw new Error("gather gradient: only axis 0 without batch dims is supported");
      const rest = x.shape.slice(1);
      return {
        x: () => tf.scatterND(tf.reshape(indices, [-1, 1]), tf.reshape(dy as tf.Tensor, [-1, ...rest]), x.shape),
        indices: () => tf.zerosLike(indices),
      };
    },
  });
  gradientsReady = true;
}

/** Whether enableGradients has run (tf.grads needs it). */
export const gradientsEnabled = (): boolean => gradientsReady;
