# Sourced by the device scripts after they set $carry: makes the carried binaries executable (the
# transfer may drop mode bits), puts the carried shared libraries first on LD_LIBRARY_PATH, and adds
# cuBLAS (loaded at run time by the calibration): the CUDA toolkit's, else a pip wheel's.
chmod +x "$carry"/bin/* 2>/dev/null
export LD_LIBRARY_PATH="$carry/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu \
  /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib \
  /opt/torch/.venv/lib/python3*/site-packages/nvidia/cublas/lib; do
  if compgen -G "$dir/libcublas.so.13*" >/dev/null; then
    export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$dir"
    break
  fi
done
