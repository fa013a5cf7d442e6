// prefprobe's event-loop addon, for the webgpu backend (src/model/webgpu.ts). WebGPU reads a GPU buffer back
// only through a promise (GPUBuffer.mapAsync), which Dawn's Node bindings settle from callbacks that libuv runs;
// prefprobe's model and analysis code read tensors synchronously (dataSync). runOnce() runs the callbacks that
// are ready, once, without blocking, so a synchronous read can wait for its mapping inside the call.
// muteStderr()/restoreStderr() point file descriptor 2 at the null device and back: Dawn prints its adapter
// probing warnings ("Couldn't load Vulkan", reduced limits) from C++, where console.warn cannot filter them.
// Needs no library beyond Node's headers, so it builds wherever a C compiler is (binding.gyp: prefprobe_loop).
#define _POSIX_C_SOURCE 200809L // dup, dup2 and close under -std=c11
#define NAPI_VERSION 8
#include <node_api.h>
#include <uv.h>
#include <fcntl.h>
#ifdef _WIN32
#include <io.h>
#define dup _dup
#define dup2 _dup2
#define close _close
#define open _open
#define NULL_DEVICE "NUL"
#else
#include <unistd.h>
#define NULL_DEVICE "/dev/null"
#endif

static napi_value number(napi_env env, double v) {
  napi_value r;
  napi_create_double(env, v, &r);
  return r;
}

// runOnce() → whether libuv has more work (uv_run's return), after running what is ready now.
static napi_value run_once(napi_env env, napi_callback_info info) {
  (void)info;
  uv_loop_t *loop;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok) {
    napi_throw_error(env, NULL, "prefprobe_loop: no libuv loop for this thread");
    return NULL;
  }
  return number(env, uv_run(loop, UV_RUN_NOWAIT));
}

// muteStderr() → a copy of the old descriptor 2 for restoreStderr, or -1 when nothing was changed.
static napi_value mute_stderr(napi_env env, napi_callback_info info) {
  (void)info;
  int saved = dup(2);
  if (saved < 0) return number(env, -1);
  int quiet = open(NULL_DEVICE, O_WRONLY);
  if (quiet < 0 || dup2(quiet, 2) < 0) {
    if (quiet >= 0) close(quiet);
    close(saved);
    return number(env, -1);
  }
  close(quiet);
  return number(env, saved);
}

// restoreStderr(saved): descriptor 2 as it was before muteStderr (a negative `saved` does nothing).
static napi_value restore_stderr(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int32_t saved = -1;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 ||
      napi_get_value_int32(env, argv[0], &saved) != napi_ok) {
    napi_throw_type_error(env, NULL, "restoreStderr(saved) needs muteStderr's number");
    return NULL;
  }
  if (saved >= 0) {
    dup2(saved, 2);
    close(saved);
  }
  return NULL;
}

static napi_value init(napi_env env, napi_value exports) {
  const struct { const char *name; napi_callback fn; } fns[] = {
    {"runOnce", run_once}, {"muteStderr", mute_stderr}, {"restoreStderr", restore_stderr}};
  for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++) {
    napi_value f;
    napi_create_function(env, fns[i].name, NAPI_AUTO_LENGTH, fns[i].fn, NULL, &f);
    napi_set_named_property(env, exports, fns[i].name, f);
  }
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
