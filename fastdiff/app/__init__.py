"""The command-line application around the library: `fastdiff` commands (`cli`), resumable sampling runs (`jobs`),
training (`trainer`), checkpoint files (`checkpoint`) and the benchmark table (`benchtable`)."""
