"""The output folder and its files: the one owner of a run's folder (`folder`: lock, configuration, units, results.json
last, readers), atomic writes (`atomic`), content hashes (`hashing`), the lock (`lock`), LibriLight's book files and
curve (`report`)."""
