"""Repository rules for system dependencies that live outside a fixed path."""

def _cuda_headers_impl(ctx):
    root = ctx.os.environ.get("CUDA_PATH") or ctx.os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    include = ctx.path(root + "/include")
    if not ctx.path(root + "/include/cuda.h").exists:
        fail("tidepool: no CUDA toolkit headers at %s (set CUDA_PATH or CUDA_HOME)" % root)
    ctx.symlink(include, "include")
    ctx.file("BUILD", """
# cuda.h alone: tidepool resolves the driver at run time and never links it.
cc_library(
    name = "cuda_headers",
    hdrs = ["include/cuda.h"],
    includes = ["include"],
    visibility = ["//visibility:public"],
)

# nccl.h (NCCL 2.27 or newer, shipped with the CUDA toolkit on the build machine) and the CUDA
# runtime headers it includes; NCCL itself is opened at run time (nccl/nccl_library.h).
cc_library(
    name = "nccl_headers",
    hdrs = glob(["include/*.h", "include/*.hpp", "include/crt/**", "include/nv/**"]),
    includes = ["include"],
    visibility = ["//visibility:public"],
)
""")

cuda_headers_repository = repository_rule(
    implementation = _cuda_headers_impl,
    environ = ["CUDA_PATH", "CUDA_HOME"],
    local = True,
)
