"""Run configs: JSON files composed of parts ("include"), read into a typed, frozen Config whose
sections are defined and checked by the modules that use them (load.py: Config, load_config;
sections.py: the sections of the packages above config; galaxy/keys.py: what a key is made of)."""
