"""Data: audio files read at Mimi's rate (`librilight`: LibriLight books, audio reading and resampling), the benchmark
layouts (`benchmarks`: ZeroSpeech 2021, StoryCloze, SALMon), moshi-finetune dialogues (`dialogues`), and their Mimi
codes with the on-disk cache (`codes`)."""
