from escalator.cli import main

main()
