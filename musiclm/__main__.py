from musiclm.cli import main

main()
