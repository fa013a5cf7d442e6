{
  "variables": { "prefprobe_blas%": 1 },
  "targets": [
    {
      "target_name": "prefprobe_loop",
      "sources": ["loop.c"],
      "cflags": ["-O2", "-std=c11"]
    }
  ],
  "conditions": [
    ["prefprobe_blas==1", {
      "targets": [
        {
          "target_name": "prefprobe_blas",
          "sources": ["blas.c"],
          "cflags": ["-O3", "-std=c11"],
          "conditions": [
            ["OS=='mac'", {
              "defines": ["PREFPROBE_ACCELERATE", "ACCELERATE_NEW_LAPACK"],
              "libraries": ["-framework Accelerate"],
              "xcode_settings": { "OTHER_CFLAGS": ["-O3"] }
            }, {
              "include_dirs": ["<!@(sh ./blas-include.sh)"],
              "libraries": ["-lopenblas", "-lm"]
            }]
          ]
        }
      ]
    }]
  ]
}
