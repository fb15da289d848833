from taskmesh.cli import main

main()
