"""The research prototype's (misspelt) name for profile_flops.py; same arguments."""
from profile_flops import main

if __name__ == "__main__":
    main()
