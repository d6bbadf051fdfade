from hyprune.cli import main

main()
